"""CURVE key files, as `poolbroker keygen` writes them (zmq.auth's certificate format)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq.auth

SERVER_KEY_ENV = "POOLBROKER_SERVER_KEY"  # the broker's public key: a file, or the 40-character z85 text
CLIENT_KEY_ENV = "POOLBROKER_CLIENT_KEY"  # this client's key pair: a .key_secret file


def load_key_pair(path: str | os.PathLike[str], what: str) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a .key_secret file readable by its owner only (as ssh insists)."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"can't read {what} {path}: {exc}") from None
    if mode & 0o077:
        raise ValueError(f"{what} {path} is readable by others (mode {mode:o}): chmod 600 it")
    if secret is None:
        raise ValueError(f"{what} {path} holds no secret key (give the .key_secret file)")
    return public, secret


def load_public_key(key: str | os.PathLike[str], what: str) -> bytes:
    """A z85 public key, given as the key itself (40 characters) or as a key file."""
    text = os.fspath(key)
    if len(text) == 40 and not os.path.exists(text):
        return text.encode()
    try:
        public, _ = zmq.auth.load_certificate(text)
    except (OSError, ValueError) as exc:
        raise ValueError(f"can't read {what} {text}: {exc}") from None
    return public
