"""ocicache: a pull-through caching proxy for OCI container registries."""

__version__ = "0.1.0"
