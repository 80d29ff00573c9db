"""PostgreSQL's CancelRequest: a new connection to the server that says which backend (its pid and
secret) should stop its current query, then closes. The server never answers it.

A cancel is rare and its connect may wait, so a short-lived thread carries it: the loop never
waits on it."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from poolbroker.wire.pgwire import cancel_request

log = logging.getLogger("poolbroker")


def send_cancel(address: Any, family: int, backend_key: tuple[int, int], timeout: float) -> None:
    """Send a CancelRequest for `backend_key` to the server at `address`, from another thread."""
    request = cancel_request(*backend_key)

    def carry() -> None:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                sock.sendall(request)
                sock.recv(1)  # (the server closes once it has read it: wait for that, within timeout)
        except OSError as exc:
            log.warning("a CancelRequest to %s failed: %s", address, exc)

    threading.Thread(target=carry, name="poolbroker-cancel", daemon=True).start()
