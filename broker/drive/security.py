"""Who may connect to the broker and who may administer it.

- ipc: the socket file is 0600 in a directory only its owner can write to, so only the broker's
  user (and root) can connect; a peer is an administrator when the kernel says it runs as that user.
- tcp on loopback: any local process can connect, nobody administers.
- tcp elsewhere: CURVE only. Clients prove a key listed in `curve_clients` (or `admin_keys`);
  administrators are the keys in `admin_keys`.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from poolbroker.broker.settings import BrokerConfig, ConfigError
from poolbroker.wire.keys import load_key_pair


@dataclass(frozen=True)
class CurveKeys:
    """The broker's key pair and the z85 public keys it lets in."""

    public: bytes
    secret: bytes
    clients: frozenset[bytes]
    admins: frozenset[bytes]


def is_loopback_tcp(endpoint: str) -> bool:
    """tcp://127.x.x.x:PORT, tcp://[::1]:PORT or tcp://localhost:PORT."""
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: maybe reachable from elsewhere


def check_bind(endpoint: str, curve: CurveKeys | None) -> None:
    """Refuse an endpoint that other hosts could reach without CURVE."""
    if endpoint.startswith("tcp://") and not is_loopback_tcp(endpoint) and curve is None:
        raise ConfigError(
            f"{endpoint} is not a loopback address: it needs CURVE (curve_secret_key and curve_clients;"
            " `poolbroker keygen DIR` writes key pairs). Plain tcp is only for 127.0.0.1 or ::1."
        )
    if not endpoint.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"{endpoint}: the broker binds ipc://PATH or tcp://HOST:PORT")


def _public_keys(directory: str, what: str) -> frozenset[bytes]:
    if not os.path.isdir(directory):
        raise ConfigError(f"{what} {directory} is not a directory")
    try:
        return frozenset(zmq.auth.load_certificates(directory))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"can't read the keys in {what} {directory}: {exc}") from None


def load_curve(config: BrokerConfig) -> CurveKeys | None:
    """The CURVE keys the config names, or None when it names none."""
    if config.curve_secret_key is None:
        if config.curve_clients is not None or config.admin_keys is not None:
            raise ConfigError("curve_clients and admin_keys need curve_secret_key (the broker's own key)")
        return None
    if config.curve_clients is None and config.admin_keys is None:
        raise ConfigError("curve_secret_key needs curve_clients: a directory of the client keys to let in")
    try:
        public, secret = load_key_pair(config.curve_secret_key, "curve_secret_key")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    clients = _public_keys(config.curve_clients, "curve_clients") if config.curve_clients else frozenset()
    admins = _public_keys(config.admin_keys, "admin_keys") if config.admin_keys else frozenset()
    return CurveKeys(public, secret, clients, admins)


class _KeyCheck:
    """The authenticator's callback: a client gets in if its key is listed."""

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed


def serve_curve(ctx: zmq.Context[Any], sock: zmq.Socket[Any], keys: CurveKeys) -> ThreadAuthenticator:
    """Make `sock` a CURVE server that lets in the listed keys (pyzmq's ZAP handler, in a thread of
    its own: it runs only for handshakes). Call before bind."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", _KeyCheck(keys.clients | keys.admins))
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    return auth


def peer_is_admin(frame: zmq.Frame, ipc: bool, curve: CurveKeys | None) -> bool:
    """May the sender of `frame` administer? On ipc: it runs as our user (the kernel's word, through
    SO_PEERCRED); with CURVE: its key is an admin key; on plain tcp: never."""
    if curve is not None:
        try:
            return str(frame.get("User-Id")).encode() in curve.admins
        except zmq.ZMQError:
            return False
    if ipc:
        return peer_credentials(frame)[0] == os.getuid()
    return False


def peer_credentials(frame: zmq.Frame) -> tuple[int | None, int | None]:
    """(uid, pid) of an ipc peer, from libzmq's "localhost:UID:GID:PID" Peer-Address; else Nones."""
    try:
        parts = str(frame.get("Peer-Address")).split(":")
    except zmq.ZMQError:
        return None, None
    if len(parts) == 4 and parts[1].isdigit() and parts[3].isdigit():
        return int(parts[1]), int(parts[3])
    return None, None


def key_files(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """The public key file and the key pair file keygen writes."""
    return Path(directory) / f"{name}.key", Path(directory) / f"{name}.key_secret"


def keygen(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write NAME.key (public: give it out) and NAME.key_secret (0600: keep it) in `directory`."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret file is written readable by us alone
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)
