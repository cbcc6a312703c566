"""Built-in transports drivers."""
