"""poolbroker's broker: one process that owns upstream connections and leases them to workers."""

__version__ = "0.1.0"
