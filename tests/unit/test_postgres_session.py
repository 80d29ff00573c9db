"""What a holder leaves on a PostgreSQL connection, as the broker's tracker judges it (pure):
messages split at any byte, transactions left open, statements that outlive their transaction,
and streams left half way; and the `ready` read that takes a whole answer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolbroker.broker.decide.exchange import READY_CHUNK, ReadFailed, take_ready
from poolbroker.broker.decide.protocols import CLOSE, KEEP, RUN_RESET, pool_protocol
from poolbroker.broker.settings import PoolConfig
from poolbroker.sessions.postgres import PostgresSession, session_change
from poolbroker.sessions.verdict import CLEAN, OUT_OF_SYNC, RESET
from poolbroker.wire.pgwire import Frames, message, query


def parse(sql: str, name: str = "") -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0\0\0")


SYNC = message(b"S", b"")
ANSWER = message(b"T", b"\0\0") + message(b"D", b"\0\1\0\0\0\1x") + message(b"C", b"SELECT 1\0")


def ready(status: bytes) -> bytes:
    return message(b"Z", status)


def session(sent: bytes, received: bytes) -> PostgresSession:
    tracker = PostgresSession()
    tracker.sent(sent)
    tracker.received(received)
    return tracker


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_frames_come_out_the_same_however_the_bytes_are_split(cuts: list[int]) -> None:
    stream = query("SELECT 1") + parse("SELECT $1") + SYNC + message(b"X", b"")
    frames, found, at = Frames(keep=b"Q"), [], 0
    for cut in cuts:
        found += frames.feed(stream[at : at + cut])
        at += cut
    found += frames.feed(stream[at:])
    assert found == [(ord("Q"), b"SELECT 1\0"), (ord("P"), b""), (ord("S"), b""), (ord("X"), b"")]
    assert not frames.partial and not frames.error


def test_a_length_that_is_no_length_is_an_error_not_a_hang() -> None:
    frames = Frames()
    frames.feed(b"Q\x00\x00\x00\x02")
    assert frames.error


BIND_EXECUTE = message(b"B", b"\0\0\0\0\0\0\0\0") + message(b"E", b"\0\0\0\0\0")


def test_answered_queries_between_transactions_are_clean() -> None:
    tracker = session(
        query("SELECT 1") + parse("SELECT $1") + BIND_EXECUTE + SYNC, ANSWER + ready(b"I") + ANSWER + ready(b"I")
    )
    assert tracker.verdict()[0] is CLEAN
    assert tracker.at_rest()


def test_an_unnamed_statement_keeps_the_lease_from_its_parse_to_its_execute() -> None:
    # pg8000: Parse, Sync; Describe, Sync, Bind, Flush; Execute, Sync, each after the last answer.
    # The unnamed statement and portal live on this backend only: a lease that ended between them
    # would Bind or Execute on another.
    tracker = session(parse("SELECT $1") + SYNC, ready(b"I"))
    assert not tracker.at_rest()
    assert tracker.verdict()[0] is CLEAN  # (given back here, nothing outlives it: the next Parse replaces it)
    tracker.sent(message(b"D", b"S\0") + SYNC + message(b"B", b"\0\0\0\0\0\0\0\0") + message(b"H", b""))
    tracker.received(message(b"t", b"\0\0") + ready(b"I") + message(b"2", b""))
    assert not tracker.at_rest()
    tracker.sent(message(b"E", b"\0\0\0\0\0") + SYNC)
    tracker.received(ANSWER + ready(b"I"))
    assert tracker.at_rest()


def test_a_transaction_left_open_or_failed_needs_the_reset() -> None:
    assert session(query("BEGIN"), ready(b"T")).verdict() == (RESET, "a transaction left open")
    assert session(query("BEGIN; SELECT 1/0"), ready(b"E")).verdict()[0] is RESET
    assert not session(query("BEGIN"), ready(b"T")).at_rest()


def test_answers_owed_or_a_message_half_way_close_the_connection() -> None:
    assert session(query("SELECT pg_sleep(30)"), b"").verdict()[0] is OUT_OF_SYNC
    assert session(query("SELECT 1")[:-3], b"").verdict()[0] is OUT_OF_SYNC
    assert session(query("SELECT 1"), (ANSWER + ready(b"I"))[:-2]).verdict()[0] is OUT_OF_SYNC
    assert session(message(b"X", b""), b"").verdict() == (OUT_OF_SYNC, "the holder sent Terminate")
    after_a_change = session(query("SET x.y = 1") + message(b"X", b""), ready(b"I"))
    assert after_a_change.verdict() == (OUT_OF_SYNC, "the holder sent Terminate")


def test_statements_that_outlive_their_transaction_are_seen() -> None:
    for sql in (
        "SET search_path TO x",
        "set session statement_timeout = 5",
        "SELECT 1; SET application_name = 'x'",
        "/* hint */ RESET ALL",
        "-- note\nPREPARE p AS SELECT 1",
        "LISTEN jobs",
        "CREATE TEMP TABLE t (x int)",
        "create local temporary table t (x int)",
        "SELECT pg_advisory_lock(42)",
        "select pg_try_advisory_lock_shared(1)",
        "SELECT set_config('a.b', 'c', false)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    ):
        assert session_change(sql.encode()), sql
    for sql in (
        "SELECT 1",
        "UPDATE t SET x = 1",
        "SET LOCAL statement_timeout = 5",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SELECT pg_advisory_xact_lock(42)",
        "SELECT 'SET x'",  # (inside a string, after no semicolon)
    ):
        assert not session_change(sql.encode()), sql


def test_a_named_prepared_statement_changes_the_session_and_an_unnamed_one_does_not() -> None:
    assert session(parse("SELECT 1", "_pg3_0") + SYNC, ready(b"I")).verdict() == (
        RESET,
        "it ran a named prepared statement",
    )
    assert session(parse("SELECT 1") + SYNC, ready(b"I")).verdict()[0] is CLEAN
    # One the worker's link named after its content: whoever uses it next prepares it again first.
    assert session(parse("SELECT 1", "pb_0123abcd") + SYNC, ready(b"I")).verdict()[0] is CLEAN


def postgres_pool(**settings: object) -> PoolConfig:
    return PoolConfig("pg", "127.0.0.1", 5432, protocol="postgres", username="app", **settings)  # type: ignore[arg-type]


def test_session_mode_resets_every_return_and_transaction_mode_only_what_it_must() -> None:
    session_mode = pool_protocol(postgres_pool())
    transaction_mode = pool_protocol(postgres_pool(pool_mode="transaction"))
    clean = session(query("SELECT 1"), ANSWER + ready(b"I"))
    changed = session(query("SET x.y = 1"), ready(b"I"))
    open_tx = session(query("BEGIN"), ready(b"T"))
    owed = session(query("SELECT 1"), b"")
    assert session_mode.on_return(clean).action == RUN_RESET
    assert transaction_mode.on_return(clean).action == KEEP
    assert transaction_mode.on_return(changed).action == RUN_RESET
    assert transaction_mode.on_return(open_tx).action == RUN_RESET
    assert session_mode.on_return(owed).action == transaction_mode.on_return(owed).action == CLOSE
    # "when done" ends a lease between transactions, whatever the reset must then undo
    assert transaction_mode.conversation_over(changed) and not transaction_mode.conversation_over(open_tx)


# -- the `ready` read: a PostgreSQL answer whole, in one round trip ------------------------------


def test_a_ready_read_takes_up_to_the_nth_ready_for_query_however_the_bytes_come() -> None:
    stream = ANSWER + ready(b"T") + ANSWER + ready(b"I") + b"next"
    buf, walked, found = bytearray(), 0, 0
    for at in range(len(stream)):  # a byte at a time: never an answer cut short
        buf.append(stream[at])
        data, walked, found = take_ready(buf, False, 2, walked, found)
        if data is not None:
            break
    assert data == ANSWER + ready(b"T") + ANSWER + ready(b"I")
    whole = bytearray(stream)
    assert take_ready(whole, False, 2, 0, 0)[0] == data and whole == b"next"  # (what follows stays)


def test_a_ready_read_stops_where_the_server_waits_for_copy_data_and_at_the_chunk() -> None:
    copy_in = message(b"G", b"\0\0\0")
    assert take_ready(bytearray(copy_in + b"x"), False, 1, 0, 0)[0] == copy_in
    big = bytearray(message(b"D", b"\0" * (READY_CHUNK + 10)))
    assert take_ready(big, False, 1, 0, 0)[0] is not None and not big  # (a large result goes in pieces)
    assert take_ready(bytearray(ANSWER), False, 1, 0, 0)[0] is None  # (not all there yet)
    assert take_ready(bytearray(ANSWER), True, 1, 0, 0)[0] == ANSWER  # (the server closed: what came)


@pytest.mark.parametrize("row", [READY_CHUNK - 7, READY_CHUNK + 10, 3 * READY_CHUNK + 5, 40])
@pytest.mark.parametrize("arrives_in", [4096, 65536, 10**9])
def test_a_large_answer_comes_in_pieces_and_each_read_walks_past_what_the_last_one_cut(
    row: int, arrives_in: int
) -> None:
    # One big DataRow (or many small ones): a piece ends mid-message, and the next read must not
    # take the rest of that message for a message's start (it waited forever for a length of
    # "xxxx" before).
    rows = message(b"D", b"x" * row) * (1 if row > 100 else 20_000)
    stream = message(b"T", b"\0\0") + rows + message(b"C", b"SELECT 1\0") + ready(b"I") + b"next"
    buf, walked, found, pieces = bytearray(), 0, 0, []
    for at in range(0, len(stream), arrives_in):  # as the socket delivers it
        buf += stream[at : at + arrives_in]
        while (taken := take_ready(buf, False, 1, walked, found))[0] is not None:
            data, walked, found = taken
            pieces.append(data)
            if data.endswith(ready(b"I")):
                break
            # (a new read: the walk starts where the last piece said, the count afresh)
            found = 0
        else:
            walked, found = taken[1], taken[2]
        if pieces and pieces[-1].endswith(ready(b"I")):
            break
    assert b"".join(pieces) + bytes(buf) == stream  # every byte once, in order, and the answer whole
    assert bytes(buf) == b"next" and walked == 0


def test_a_ready_read_of_bytes_that_are_not_postgresql_fails() -> None:
    with pytest.raises(ReadFailed, match="not PostgreSQL"):
        take_ready(bytearray(b"Z\0\0\0\1" + b"\0" * 10), False, 1, 0, 0)
