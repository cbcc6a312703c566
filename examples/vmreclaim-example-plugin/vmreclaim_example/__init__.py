"""An example third-party vmreclaim plugin package."""
