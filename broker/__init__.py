"""poolbroker's broker: one process that owns upstream connections and leases them to workers."""

from poolbroker.wire.version import VERSION as __version__

__all__ = ["__version__"]
