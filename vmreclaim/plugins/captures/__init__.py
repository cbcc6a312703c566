"""Built-in captures drivers."""
