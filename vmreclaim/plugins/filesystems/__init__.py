"""Built-in filesystems drivers."""
