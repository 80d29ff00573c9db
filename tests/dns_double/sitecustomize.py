"""A test double for DNS only: a broker started with this directory on PYTHONPATH and
$POOLBROKER_TEST_DNS_STALL set to a directory finds names ending in ".stall.test" slow to look up.
Such a lookup writes `started` in that directory, then waits (at most 30 s) until a file `answer`
appears there, and answers 127.0.0.1. Every other name is looked up as usual."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

_STALL = os.environ.get("POOLBROKER_TEST_DNS_STALL")

if _STALL:
    _real_getaddrinfo = socket.getaddrinfo

    def _getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        numeric_only = kwargs.get("flags", args[3] if len(args) > 3 else 0) & socket.AI_NUMERICHOST
        if isinstance(host, str) and host.endswith(".stall.test") and not numeric_only:
            folder = Path(str(_STALL))
            (folder / "started").touch()
            deadline = time.monotonic() + 30
            while not (folder / "answer").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            host = "127.0.0.1"
        return _real_getaddrinfo(host, port, *args, **kwargs)

    socket.getaddrinfo = _getaddrinfo
