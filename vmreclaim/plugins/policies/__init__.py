"""Built-in policies drivers."""
