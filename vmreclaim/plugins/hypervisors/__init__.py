"""Built-in hypervisors drivers."""
