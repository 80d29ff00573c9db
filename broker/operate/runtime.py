"""Where the broker may listen: the private ipc directory, and a socket file left by a dead broker."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from poolbroker.broker.settings import ConfigError
from poolbroker.wire.endpoint import runtime_dir

IPC_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def prepare_ipc(endpoint: str) -> None:
    """Make an ipc endpoint bindable: its directory exists (0700 when we create it) and only we
    can write to it, and a socket file there is either stale (removed) or refused as in use."""
    path = Path(endpoint.removeprefix("ipc://"))
    _check_length(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if check_ipc(endpoint):
        path.unlink()  # nobody listens: left by a broker that died


def check_ipc(endpoint: str) -> bool:
    """What prepare_ipc would refuse (ConfigError), found without changing anything (`serve
    --check`); True when a stale socket file, left by a broker that died, is there to remove."""
    path = Path(endpoint.removeprefix("ipc://"))
    _check_length(path)
    directory = path.parent
    if not directory.exists():
        return False  # (made 0700 at start)
    # Whoever can write to the directory could replace the socket with their own and read every
    # request; the default directory must moreover be private (0700).
    info = directory.stat()
    mode = stat.S_IMODE(info.st_mode)
    writable_by_others = info.st_uid not in (os.getuid(), 0) or mode & 0o022
    if writable_by_others or (directory == runtime_dir() and (info.st_uid != os.getuid() or mode & 0o077)):
        need = "mode 0700" if directory == runtime_dir() else "no write permission for group or others"
        raise ConfigError(
            f"{directory} is not safe for the broker's socket: it must be owned by uid {os.getuid()}"
            f" with {need} (it is uid {info.st_uid}, mode {mode:o}); bind a path in a directory of its own"
        )
    if not path.exists():
        return False
    if not path.is_socket():
        raise ConfigError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return True
    finally:
        probe.close()
    raise ConfigError(f"another broker is already listening on ipc://{path}")


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) > IPC_PATH_MAX:
        raise ConfigError(f"ipc path {path} is longer than {IPC_PATH_MAX} bytes")
