"""Where the broker listens by default: an ipc socket in a private per-user runtime directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ENDPOINT_ENV = "POOLBROKER_ENDPOINT"
SOCKET_NAME = "broker.sock"
LEND_SUFFIX = ".lend"  # beside an ipc endpoint's socket: where upstream sockets are lent


def runtime_dir() -> Path:
    """The per-user directory for the default socket ($XDG_RUNTIME_DIR/poolbroker, else in /tmp)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "poolbroker"
    return Path(tempfile.gettempdir()) / f"poolbroker-{os.getuid()}"


def default_endpoint() -> str:
    """$POOLBROKER_ENDPOINT if set, else ipc:// in runtime_dir()."""
    return os.environ.get(ENDPOINT_ENV) or f"ipc://{runtime_dir() / SOCKET_NAME}"


def lending_path(endpoint: str) -> str | None:
    """The Unix socket beside an ipc endpoint where the broker lends upstream sockets themselves
    (same directory, same permissions); None for tcp, where nothing can be lent (another host)."""
    if not endpoint.startswith("ipc://"):
        return None
    return endpoint.removeprefix("ipc://") + LEND_SUFFIX
