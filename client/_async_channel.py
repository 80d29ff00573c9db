"""One DEALER socket per event loop, shared by its tasks (AsyncClient's): each request carries its
id, and one reader task hands each reply to the task that waits for it. A reply nobody waits for
any more gives back the lease it grants."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from poolbroker.client._channel import MAX_TEMPLATES, Curve
from poolbroker.client._errors import BrokerUnavailable, LimitExceeded
from poolbroker.client._exchanges import release_template
from poolbroker.wire.protocol import RELEASE_DISCARD, RELEASE_KEEP, VERSION, Template

__all__ = ["AsyncChannel"]


class AsyncChannel:
    """One DEALER socket of one event loop, shared by its tasks: replies are matched to requests
    by id."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, curve: Curve | None, max_message_size: int) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.get_running_loop()
        self.endpoint = endpoint
        self.max_message_size = max_message_size
        self.generation = 0  # (never reset: a timed-out request's late reply is simply dropped)
        self.templates: dict[tuple[Any, ...], Template] = {}
        self.packer = msgpack.Packer(use_bin_type=True)
        self.next_id = 1
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.sock: zmq.asyncio.Socket = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.sock.curve_serverkey = curve.server_key
            self.sock.curve_publickey = curve.public
            self.sock.curve_secretkey = curve.secret
        self.sock.connect(endpoint)
        self._reader = self.loop.create_task(self._read_replies(), name="poolbroker replies")

    def remember(self, key: tuple[Any, ...], template: Template) -> Template:
        if len(self.templates) >= MAX_TEMPLATES:
            self.templates.clear()
        self.templates[key] = template
        return template

    async def call(self, message: dict[str, Any], wait: float) -> dict[str, Any]:
        rid = self.next_id
        self.next_id = rid + 1
        message["v"] = VERSION
        message["id"] = rid
        return await self._round_trip(self.packer.pack(message), rid, wait)

    async def call_packed(self, template: Template, values: tuple[Any, ...], wait: float) -> dict[str, Any]:
        rid = self.next_id
        self.next_id = rid + 1
        return await self._round_trip(template.pack(self.packer.pack, rid, values), rid, wait)

    async def _round_trip(self, body: bytes, rid: int, wait: float) -> dict[str, Any]:
        if len(body) > self.max_message_size:
            limit = self.max_message_size
            raise LimitExceeded(f"a request of {len(body)} bytes is over the limit of {limit} (max_message_size)")
        answer: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.waiting[rid] = answer
        taken = False
        try:
            async with asyncio.timeout(wait):
                await self.sock.send(body)
                reply = await answer
                taken = True
                return reply
        except TimeoutError:
            raise BrokerUnavailable(f"no answer from the broker at {self.endpoint} within {wait:.1f}s") from None
        finally:
            # Given up (answered, timed out or cancelled): a late answer finds nobody, and a grant
            # in it is given back (_unclaimed).
            self.waiting.pop(rid, None)
            if not taken and answer.done() and not answer.cancelled():
                # The answer came, but the task was cancelled (or timed out) before it took it: no
                # one ever will. Without this, a grant in it would hold its connection until the
                # broker's lease_idle_timeout.
                self._unclaimed(answer.result())

    def send_now(self, template: Template, values: tuple[Any, ...]) -> asyncio.Future[dict[str, Any]]:
        """A request sent now, in order with every other (no task switch before it goes): its
        answer comes in the future returned (cancelled if the channel closes first)."""
        rid = self.next_id
        self.next_id = rid + 1
        answer: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self.waiting[rid] = answer
        # (an asyncio socket tries the send at once, and queues it in order if it can't go yet)
        asyncio.ensure_future(self.sock.send(template.pack(self.packer.pack, rid, values))).add_done_callback(_ignore)
        return answer

    def send_oneway(self, template: Template, values: tuple[Any, ...]) -> None:
        """A request that wants no answer, sent now (from a task being cancelled, too)."""
        rid = self.next_id
        self.next_id = rid + 1
        try:
            # (an asyncio socket tries a send at once: a NOBLOCK one is done, or failed, on return)
            sent = asyncio.ensure_future(self.sock.send(template.pack(self.packer.pack, rid, values), zmq.NOBLOCK))
            sent.add_done_callback(_ignore)
        except zmq.ZMQError:
            pass  # the broker is unreachable; it will reclaim the lease itself

    async def _read_replies(self) -> None:
        while True:
            try:
                data = await self.sock.recv()
            except zmq.ZMQError:
                return  # the socket is closed
            try:
                reply = msgpack.unpackb(data)
            except Exception:  # msgpack raises several types for bad input
                continue  # (whoever waited for it is told by its deadline)
            rid = reply.get("id") if type(reply) is dict else None
            answer = self.waiting.pop(rid, None) if type(rid) is int else None
            if answer is None or answer.done():
                self._unclaimed(reply)
            else:
                answer.set_result(reply)

    def _unclaimed(self, reply: Any) -> None:
        """An answer nobody waits for any more. A lease granted in it goes back at once: kept if
        only granted, discarded if an exchange ran on it (its holder never saw the answer)."""
        if not (type(reply) is dict and reply.get("ok") is True and not reply.get("released")):
            return
        token = reply.get("lease")
        if isinstance(token, bytes):
            mode = RELEASE_DISCARD if "data" in reply else RELEASE_KEEP
            self.send_oneway(release_template(self, mode), (token,))

    def close(self) -> None:
        self._reader.cancel()
        for answer in self.waiting.values():
            answer.cancel()
        self.sock.close(linger=500)  # (a last one-way release may still be leaving)


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # (retrieved: a failed one-way send has nobody to tell)
