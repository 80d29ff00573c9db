"""This broker's side of etcd, through etcd3gw: etcd's v3 JSON gateway over HTTP (requests).

Why etcd3gw: it is kept (OpenStack's), it speaks to etcd 3.4's gateway with no gRPC stack to
build, and its calls are plain blocking requests, which suit the cluster agent's own thread (they
never run in the broker's loop). It names one endpoint: `Etcd` holds a client per endpoint and
moves on to the next when one can't be reached, so a member down (the leader killed, say) costs
one retry. Keys and values are bytes; the gateway's JSON carries them in base64.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client

log = logging.getLogger("broker.cluster")


class EtcdUnavailable(Exception):
    """No endpoint answered (each was tried once)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A key as a range read found it."""

    key: bytes
    value: bytes
    mod_revision: int
    lease: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def range_end(prefix: bytes) -> bytes:
    """The end of the range of every key under `prefix` (its last byte plus one)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    """A txn's put (attached to `lease` unless 0)."""
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def delete(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def unchanged(key: bytes, mod_revision: int) -> dict[str, Any]:
    """A txn's compare: the key is as a read found it (mod_revision 0: it does not exist)."""
    if mod_revision == 0:
        return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(mod_revision)}


def held_by(key: bytes, lease: int) -> dict[str, Any]:
    """A txn's compare: the key is attached to `lease` (so it is still ours)."""
    return {"key": _b64(key), "result": "EQUAL", "target": "LEASE", "lease": str(lease)}


class Etcd:
    """The etcd cluster at `endpoints`, asked one endpoint at a time."""

    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        self._clients = []
        for url in endpoints:
            parts = urlsplit(url)
            assert parts.hostname is not None and parts.port is not None  # (checked when loaded)
            client = Etcd3Client(parts.hostname, parts.port, parts.scheme, timeout=timeout, api_path="/v3/")
            self._clients.append(client)
        self._at = 0

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for _ in range(len(self._clients)):
            client = self._clients[self._at]
            try:
                result: dict[str, Any] = client.post(client.get_url(path), json=body)
                return result
            except (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError) as exc:
                log.debug("etcd at %s:%s: %s", client.host, client.port, exc)
            except etcd_errors.Etcd3Exception as exc:  # (a member that lost its leader, say)
                log.debug("etcd at %s:%s refused: %s", client.host, client.port, exc)
            self._at = (self._at + 1) % len(self._clients)
        raise EtcdUnavailable(f"no etcd endpoint answered ({len(self._clients)} tried)")

    def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds: its id."""
        return int(self._post("/lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keep_alive(self, lease: int) -> int:
        """Refresh the lease; its TTL now, or 0 if it has expired."""
        result = self._post("/lease/keepalive", {"ID": str(lease)}).get("result", {})
        return int(result.get("TTL", 0))

    def revoke(self, lease: int) -> None:
        """End the lease now: every key attached to it goes."""
        self._post("/lease/revoke", {"ID": str(lease)})

    def read(self, prefix: bytes) -> list[Entry]:
        """Every key under `prefix`, as one read at one revision."""
        result = self._post("/kv/range", {"key": _b64(prefix), "range_end": _b64(range_end(prefix))})
        return [
            Entry(
                base64.b64decode(kv["key"]),
                base64.b64decode(kv.get("value", "")),
                int(kv.get("mod_revision", 0)),
                int(kv.get("lease", 0)),
            )
            for kv in result.get("kvs", [])
        ]

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> bool:
        """Do `success` if every `compare` holds, atomically: whether it did."""
        return bool(self._post("/kv/txn", {"compare": compare, "success": success, "failure": []}).get("succeeded"))
