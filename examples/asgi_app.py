"""An ASGI app whose every request goes through poolbroker: redis.asyncio and httpx over leases.

    POOLBROKER_ENDPOINT=ipc:///run/poolbroker/broker.sock \\
        gunicorn -k uvicorn.workers.UvicornWorker -w 4 examples.asgi_app:app

The broker has two pools: "redis" (protocol = "redis") and "api" (protocol = "http", an HTTP
service). Paths: /hit counts a hit in Redis and answers "PID HITS"; /api asks the API's /health
and answers its status; /five runs five Redis commands (a hit and four reads); /hold?seconds=N
holds a Redis lease that long (to show what happens when a worker holding one is killed). Plain
ASGI, no framework: what matters is the clients. `held_app` is the same app with one lease per
request (poolbroker.web.AsyncLeasePerRequest): /five's commands then share one socket lease.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import httpx
import redis.asyncio

from poolbroker import AsyncClient
from poolbroker.httpx import AsyncPoolBrokerTransport
from poolbroker.redis_asyncio import AsyncBrokerConnectionPool
from poolbroker.web import AsyncLeasePerRequest

# At import time, even before fork: sockets are made per process and event loop, on first use.
broker = AsyncClient()
cache = redis.asyncio.Redis(connection_pool=AsyncBrokerConnectionPool(broker, "redis"))
api = httpx.AsyncClient(transport=AsyncPoolBrokerTransport(broker, "api"), base_url="http://api.internal")


async def app(
    scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
) -> None:
    if scope["type"] != "http":
        return  # (lifespan and the rest: nothing to set up)
    path = scope["path"]
    if path == "/hit":
        body = f"{os.getpid()} {await cache.incr('hits')}\n".encode()
    elif path == "/five":
        hits = await cache.incr("hits")
        seen = [await cache.get("hits") for _ in range(4)]
        body = f"{os.getpid()} {hits} {len(seen)}\n".encode()
    elif path == "/api":
        body = f"{(await api.get('/health')).status_code}\n".encode()
    elif path == "/hold":
        seconds = float(parse_qs(scope["query_string"].decode())["seconds"][0])
        async with broker.lease("redis", tag="asgi-hold"):
            await asyncio.sleep(seconds)
        body = b"held\n"
    else:
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


held_app = AsyncLeasePerRequest(app)  # one lease per request, whatever its commands
