"""The pure pieces around a lease: the holder and lease tables, and one exchange's reads."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from poolbroker.broker.decide.exchange import Exchange, ReadFailed, over_limits, take
from poolbroker.broker.decide.leases import Holder, Lease, LeaseTable, Waiter
from poolbroker.wire.protocol import ErrorCode, Request

POOLS: list[Any] = [object(), object()]  # stand-ins for PoolState: the table only compares them


def lease_request(send: bytes | None = None) -> Request:
    return Request(op="lease", id=1, pool="p", pid=7, host="h", send=send)


# -- the tables, as a state machine -----------------------------------------------------------


class TableMachine(RuleBasedStateMachine):
    """Holders come and go, queue requests, are granted leases and give them back: the table's
    indexes always agree with each other."""

    holders = Bundle("holders")

    def __init__(self) -> None:
        super().__init__()
        self.table = LeaseTable()
        self.tokens = 0

    @rule(target=holders, fd=st.integers(-1, 5), process=st.sampled_from(["a", "b", "c"]))
    def connect(self, fd: int, process: str) -> Holder:
        self.tokens += 1
        holder = Holder(b"peer-%d" % self.tokens, fd, process, admin=False)
        previous = self.table.add_holder(holder)
        if previous is not None:  # its fd was reused: the driver treats it as gone
            self.drop(previous)
        return holder

    def drop(self, holder: Holder) -> None:
        self.table.remove_holder(holder)
        for waiter in list(holder.waiters):
            self.table.leaves_line(waiter)
        for lease in list(holder.leases):
            self.table.remove(lease)

    @rule(holder=holders)
    def disconnect(self, holder: Holder) -> None:
        if not holder.gone:
            self.drop(holder)

    @rule(holder=holders, pool=st.sampled_from(POOLS), size=st.integers(0, 100))
    def ask(self, holder: Holder, pool: Any, size: int) -> None:
        if not holder.gone:
            self.table.queue(Waiter(holder, lease_request(b"x" * size if size else None), pool, 5.0))

    @precondition(lambda self: any(h.waiters for h in self.table.holders.values()))
    @rule(data=st.data(), granted=st.booleans())
    def serve(self, data: st.DataObject, granted: bool) -> None:
        holder = data.draw(st.sampled_from([h for h in self.table.holders.values() if h.waiters]))
        waiter = data.draw(st.sampled_from(sorted(holder.waiters, key=id)))
        self.table.leaves_line(waiter)
        if granted:
            self.tokens += 1
            self.table.add(Lease(b"token-%d" % self.tokens, None, waiter, None, 0.0))  # type: ignore[arg-type]

    @precondition(lambda self: self.table.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(sorted(self.table.leases.values(), key=lambda lease: lease.token)))
        self.table.remove(lease)

    @invariant()
    def indexes_agree(self) -> None:
        table = self.table
        live = set(table.holders.values())
        assert all(not holder.gone for holder in live)
        assert {h for hs in table.processes.values() for h in hs} == live
        assert all(hs for hs in table.processes.values())  # no empty process entries left behind
        assert all(holder in live and holder.fd == fd for fd, holder in table.by_fd.items())
        assert {lease for holder in live for lease in holder.leases} == set(table.leases.values())
        assert table.waiting_payload == sum(w.payload for holder in live for w in holder.waiters)
        for token, lease in table.leases.items():
            assert table.lease_of(lease.peer, token) is lease and table.lease_of(b"another", token) is None
        for process, holders in table.processes.items():
            for pool in POOLS:
                expected = sum(1 for h in holders for x in (*h.leases, *h.waiters) if x.pool is pool)
                assert table.taken_by(process, pool) == expected


TestTables = TableMachine.TestCase


# -- one exchange's reads, as transcripts -----------------------------------------------------


def test_an_any_read_takes_what_is_there_up_to_n_and_eof_once_closed() -> None:
    buf = bytearray(b"hello world")
    assert take(buf, False, "any", 5, None, 0) == (b"hello", 0) and buf == bytearray(b" world")
    assert take(bytearray(), False, "any", 5, None, 0) == (None, 0)  # nothing yet: wait
    assert take(bytearray(), True, "any", 5, None, 0) == (b"", 0)  # nothing, ever: end of stream


def test_an_exact_read_waits_for_all_of_it_and_fails_if_the_stream_ends_first() -> None:
    buf = bytearray(b"abc")
    assert take(buf, False, "exactly", 5, None, 0) == (None, 0) and buf == bytearray(b"abc")
    buf += b"def"
    assert take(buf, False, "exactly", 5, None, 0) == (b"abcde", 0) and buf == bytearray(b"f")
    with pytest.raises(ReadFailed, match="upstream closed after 1 of 5 bytes") as failed:
        take(buf, True, "exactly", 5, None, 0)
    assert failed.value.code is ErrorCode.UPSTREAM_ERROR


def test_an_until_read_resumes_its_search_and_stops_at_n() -> None:
    buf = bytearray(b"+OK\r")
    data, scanned = take(buf, False, "until", 100, b"\r\n", 0)
    assert (data, scanned) == (None, 4)
    buf += b"\n+NEXT"  # the delimiter straddles the two arrivals
    assert take(buf, False, "until", 100, b"\r\n", scanned) == (b"+OK\r\n", 0) and buf == bytearray(b"+NEXT")
    with pytest.raises(ReadFailed, match=r"no delimiter b'\\r\\n' within 5 bytes") as failed:
        take(buf, False, "until", 5, b"\r\n", 0)
    assert failed.value.code is ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(ReadFailed, match="upstream closed before delimiter"):
        take(bytearray(b"+N"), True, "until", 100, b"\r\n", 0)


def test_an_exchange_clamps_its_reads_and_counts_what_is_left_to_send() -> None:
    req = Request(op="io", id=3, send=b"0123456789", read="any", n=10_000_000)
    exchange = Exchange(None, b"peer", req, first=False, max_payload=1000, now=5.0)  # type: ignore[arg-type]
    assert exchange.n == 1000  # any and until are clamped to max_payload
    assert bytes(exchange.sent(4) or b"") == b"456789" and exchange.sent(6) is None
    buf = bytearray(b"x" * 1500)
    assert exchange.take(buf, False) == b"x" * 1000 and len(buf) == 500


def test_a_send_beside_a_running_exchange_goes_after_what_it_still_has_to_send() -> None:
    req = Request(op="io", id=3, send=b"SUBSCRIBE a\r\n", read="any", n=100)
    exchange = Exchange(None, b"peer", req, first=False, max_payload=40, now=5.0)  # type: ignore[arg-type]
    assert exchange.sent(4) is not None  # part of its own send still to go
    assert exchange.send_beside(b"PING\r\n", 40) is None
    assert bytes(exchange.send or b"") == b"CRIBE a\r\nPING\r\n"
    assert exchange.sent(len(b"CRIBE a\r\nPING\r\n")) is None  # all sent: the read goes on
    assert exchange.send_beside(b"UNSUBSCRIBE\r\n", 40) is None
    assert bytes(exchange.send or b"") == b"UNSUBSCRIBE\r\n"
    problem = exchange.send_beside(b"x" * 30, 40)  # 13 pending + 30 > 40: refused, nothing joins
    assert problem is not None and "over 40" in problem and bytes(exchange.send or b"") == b"UNSUBSCRIBE\r\n"


def test_over_limits_refuses_a_send_or_an_exact_read_larger_than_max_payload() -> None:
    assert over_limits(Request(op="io", id=1, send=b"x" * 10), 10) is None
    assert "sending 11 bytes" in (over_limits(Request(op="io", id=1, send=b"x" * 11), 10) or "")
    assert "read exactly 11 bytes" in (over_limits(Request(op="io", id=1, read="exactly", n=11), 10) or "")
    assert over_limits(Request(op="io", id=1, read="any", n=10**9), 10) is None  # clamped, not refused
