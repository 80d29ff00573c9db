"""The package's version as installed: pyproject.toml's, the one place it is written. The broker
says it in its log and its ping replies; `poolbroker.__version__` is it."""

from importlib import metadata

try:
    VERSION = metadata.version("poolbroker")
except metadata.PackageNotFoundError:  # (run from a source tree that was never installed)
    VERSION = "0+unknown"
