"""Built-in formats drivers."""
