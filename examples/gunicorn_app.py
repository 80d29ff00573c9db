"""A WSGI app whose every request leases a Redis connection from poolbroker.

    POOLBROKER_ENDPOINT=ipc:///run/poolbroker/broker.sock gunicorn -w 4 examples.gunicorn_app:app
    ... gunicorn -w 4 --preload examples.gunicorn_app:app     # the Client is made before fork: fine

Paths: /hit counts a hit in Redis through redis-py (each command one lease) and answers "PID HITS";
/five runs five commands (a hit and four reads); /raw does the same as /hit on a lease by hand;
/hold?seconds=N holds a lease that long (for showing what happens when gunicorn's worker timeout
kills a worker holding one). `held_app` is the same app with one lease per request
(poolbroker.web.LeasePerRequest): /five's commands then share one socket lease.

    ... gunicorn -w 4 examples.gunicorn_app:held_app
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from urllib.parse import parse_qs

import redis

from poolbroker import Client
from poolbroker.redis import BrokerConnectionPool
from poolbroker.web import LeasePerRequest

# At import time, even under --preload: no socket is made until the first request, in the worker.
client = Client()
redis_client = redis.Redis(connection_pool=BrokerConnectionPool(client, "redis"))


def app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO")
    if path == "/hit":
        body = f"{os.getpid()} {redis_client.incr('hits')}\n".encode()
    elif path == "/five":
        hits = redis_client.incr("hits")
        seen = [redis_client.get("hits") for _ in range(4)]
        body = f"{os.getpid()} {hits} {len(seen)}\n".encode()
    elif path == "/raw":
        with client.lease("redis", tag="wsgi-raw", lazy=True) as conn:
            reply = conn.request(b"INCR hits\r\n", until=b"\r\n")  # ":<n>\r\n"
        body = f"{os.getpid()} {int(reply[1:])}\n".encode()
    elif path == "/hold":
        seconds = float(parse_qs(str(environ.get("QUERY_STRING", "")))["seconds"][0])
        with client.lease("redis", tag="wsgi-hold"):
            time.sleep(seconds)
        body = b"held\n"
    else:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


held_app = LeasePerRequest(app)  # one lease per request, whatever its commands
