"""A pytest plugin for redis-py's own test suite (loaded by scripts/client_suites.py): every
ConnectionPool the suite builds becomes a poolbroker one on the broker at PB_ENDPOINT, sync
(BrokerConnectionPool) or asyncio (AsyncBrokerConnectionPool): on its pool `redis`, or `redis3` for a client that speaks
RESP3 (asked, or redis-py's default: a pool speaks one RESP version). The URL's host and port are
dropped: the broker's pools are in front of the same Redis."""

from __future__ import annotations

import os
from typing import Any

import redis
import redis.asyncio
import redis.client
import redis.utils

from poolbroker import AsyncClient, Client
from poolbroker.redis import BrokerConnectionPool
from poolbroker.redis_asyncio import AsyncBrokerConnectionPool

ENDPOINT = os.environ["PB_ENDPOINT"]
DEFAULT_RESP = getattr(redis.utils, "DEFAULT_RESP_VERSION", 2)
# The address (the broker's pool has its own), and what a pool built from another's
# connection_kwargs brings of ours (each routed pool sets its own).
DROPPED = ("host", "port", "connection_class", "path", "broker", "pool", "tag")
_client = Client(ENDPOINT, timeout=10)


def pool_for(kwargs: dict[str, Any]) -> str:
    for key in DROPPED:
        kwargs.pop(key, None)
    protocol = kwargs.get("protocol") or DEFAULT_RESP  # (unasked, redis-py's own default, as directly)
    return "redis3" if str(protocol) == "3" else "redis"


class RoutedPool(BrokerConnectionPool):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(_client, pool_for(kwargs), **kwargs)


class AsyncRoutedPool(AsyncBrokerConnectionPool):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(AsyncClient(ENDPOINT, timeout=10), pool_for(kwargs), **kwargs)


redis.ConnectionPool = RoutedPool  # type: ignore[misc]
redis.client.ConnectionPool = RoutedPool  # type: ignore[misc]
redis.asyncio.ConnectionPool = AsyncRoutedPool  # type: ignore[misc]
