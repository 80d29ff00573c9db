"""One lease per web request: middleware that opens a LeaseScope for each request, WSGI and ASGI.

    from poolbroker.web import LeasePerRequest, AsyncLeasePerRequest

    app = LeasePerRequest(app)          # WSGI (gunicorn, any WSGI server)
    app = AsyncLeasePerRequest(app)     # ASGI (uvicorn, any ASGI server)

Within a request, each library connection on socket leases (redis-py, redis.asyncio, pymemcache,
requests, httpx) keeps the lease its first command took, and gives it back, with the verdict of its
session's tracker, when the response has ended: a request with five Redis commands takes one lease,
not five. The lease is held for the request's whole life, so a slow request holds an upstream
connection throughout: the pool's max_size bounds the requests in flight that use it. Relay leases
are not kept (the broker ends them as it sees each conversation over).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from poolbroker.client import LeaseScope

__all__ = ["AsyncLeasePerRequest", "LeasePerRequest"]


class LeasePerRequest:
    """WSGI middleware: a LeaseScope from the call to the end of the response (the server closing
    its iterable), so that a streamed body's work holds the request's leases too."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scope = LeaseScope().__enter__()
        try:
            return _ClosingBody(self.app(environ, start_response), scope)
        except BaseException:
            scope.close()
            raise


class _ClosingBody:
    """The app's body, passed on; closing it (the server always does) ends the request's scope."""

    def __init__(self, body: Iterable[bytes], scope: LeaseScope) -> None:
        self._body = body
        self._scope = scope

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._scope.close()


class AsyncLeasePerRequest:
    """ASGI middleware: a LeaseScope around each HTTP request's (and websocket's) handling; the
    tasks it starts share it. Lifespan events pass through."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        with LeaseScope():
            await self.app(scope, receive, send)
