"""Name lookups off the server loop: getaddrinfo can block for seconds, and the loop must not."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from queue import Empty, SimpleQueue
from typing import Any, Generic, TypeVar

K = TypeVar("K")  # what the caller gets back with the answer

AddrInfo = tuple[int, Any]  # (family, sockaddr), as socket.connect takes them


def numeric_address(host: str, port: int) -> AddrInfo | None:
    """The address if `host` is an IP literal (no lookup needed), else None."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return None
    family, _, _, _, sockaddr = info[0]
    return family, sockaddr


class Resolver(Generic[K]):
    """One daemon thread that answers lookups in order; `wake` is called after each answer so the
    loop collects it with results(). A daemon: a lookup stuck in the resolver never blocks exit."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._requests: SimpleQueue[tuple[K, str, int] | None] = SimpleQueue()
        self._answers: SimpleQueue[tuple[K, AddrInfo | OSError]] = SimpleQueue()
        self._thread: threading.Thread | None = None

    def lookup(self, key: K, host: str, port: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="resolver", daemon=True)
            self._thread.start()
        self._requests.put((key, host, port))

    def results(self) -> Iterator[tuple[K, AddrInfo | OSError]]:
        """The answers that have arrived, without waiting."""
        while True:
            try:
                yield self._answers.get_nowait()
            except Empty:
                return

    def close(self) -> None:
        if self._thread is not None:
            self._requests.put(None)

    def _run(self) -> None:
        while (item := self._requests.get()) is not None:
            key, host, port = item
            answer: AddrInfo | OSError
            try:
                family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
                answer = (family, sockaddr)
            except OSError as exc:
                answer = exc
            self._answers.put((key, answer))
            self._wake()
