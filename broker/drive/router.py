"""The broker's ZeroMQ ROUTER socket: how it is set up, and the plain-int calls the hot path makes
on it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import zmq
import zmq.backend

from poolbroker.broker.settings import BrokerConfig

REPLIES_QUEUED_PER_CLIENT = 100  # then replies to that client are dropped (ZeroMQ SNDHWM)
# ZMTP heartbeats: a client whose process is frozen (SIGSTOP, a hung host) stops answering them and
# its connection is dropped, which reclaims its leases. A stuck Python thread still answers (libzmq
# answers without the GIL): lease_idle_timeout and max_lease_time bound that case.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000


# The hot path calls pyzmq's compiled socket methods directly, with plain ints: the Python layer
# over them (routing-id checks, results turned into enum.Flag values) cost about 1 us a call.
EVENTS, FD, RCVMORE = int(zmq.EVENTS), int(zmq.FD), int(zmq.RCVMORE)
POLLIN = int(zmq.POLLIN)
NOBLOCK, SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)


def int_option(sock: zmq.Socket[Any]) -> Callable[[int], int]:
    """`sock.getsockopt`, for the options that are ints (FD, EVENTS, RCVMORE)."""
    return cast(Callable[[int], int], functools.partial(zmq.backend.Socket.get, sock))


def make_router(ctx: zmq.Context[Any], config: BrokerConfig) -> zmq.Socket[Any]:
    router: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    # A reply to a peer that is gone raises EHOSTUNREACH instead of vanishing: that is how an
    # unclaimed grant goes back to the pool.
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.MAXMSGSIZE, config.max_message_size)
    # Replies a client leaves unread queue here; a well-behaved client has a few in flight at
    # most, so a short queue bounds what one that never reads can make the broker hold.
    router.setsockopt(zmq.SNDHWM, REPLIES_QUEUED_PER_CLIENT)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    return router
