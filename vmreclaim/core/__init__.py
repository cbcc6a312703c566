"""The centre of vmreclaim: domain types, hook specs, pipeline, driver loader, config, errors.

Nothing here imports a plugin; plugins import only this package.
"""
