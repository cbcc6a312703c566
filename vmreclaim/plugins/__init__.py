"""Built-in drivers, one folder per plugin kind, registered through entry points like any
third-party package's drivers."""
