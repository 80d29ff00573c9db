"""poolbroker's broker: one process that owns upstream connections and leases them to workers."""

from importlib import metadata

try:
    __version__ = metadata.version("poolbroker")  # (pyproject.toml's: the one place it is written)
except metadata.PackageNotFoundError:  # (run from a source tree that was never installed)
    __version__ = "0+unknown"
