"""Where the broker may listen: the private ipc directory, and a socket file left by a dead broker."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from broker.config import ConfigError
from client.endpoint import runtime_dir

IPC_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def prepare_ipc(endpoint: str) -> None:
    """Make an ipc endpoint bindable: its directory exists (0700 when we create it), the default
    directory is private, and a socket file is either stale (removed) or refused as in use."""
    path = Path(endpoint.removeprefix("ipc://"))
    if len(os.fsencode(path)) > IPC_PATH_MAX:
        raise ConfigError(f"ipc path {path} is longer than {IPC_PATH_MAX} bytes")
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory == runtime_dir():
        # The default directory must be ours alone: anyone who can write there could swap the socket.
        info = directory.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ConfigError(
                f"{directory} must be owned by uid {os.getuid()} with mode 0700"
                f" (it is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o})"
            )
    if not path.exists():
        return
    if not path.is_socket():
        raise ConfigError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # nobody listens: left by a broker that died
        return
    finally:
        probe.close()
    raise ConfigError(f"another broker is already listening on ipc://{path}")
