"""Transaction mode's prepared statements, as the link rewrites them (poolbroker.postgres._statements):
transcripts of what the driver sends, what goes to the server, and which answers the driver sees."""

from __future__ import annotations

import struct

from poolbroker.postgres._statements import Statements
from poolbroker.wire.pgwire import Frames, message

SYNC = message(b"S", b"")
EXECUTE = message(b"E", b"\0" + struct.pack("!i", 0))
PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE = message(b"1", b""), message(b"2", b""), message(b"3", b"")
READY = message(b"Z", b"I")


def parse(name: bytes, sql: bytes) -> bytes:
    return message(b"P", name + b"\0" + sql + b"\0" + struct.pack("!h", 0))


def bind(statement: bytes) -> bytes:
    return message(b"B", b"\0" + statement + b"\0" + struct.pack("!hhh", 0, 0, 0))


def send(statements: Statements, *messages: bytes) -> list[tuple[str, bytes]]:
    """What goes to the server, as (type, the statement name a P, B, D or C names)."""
    out = b"".join(statements.sent(m[0], m) for m in messages)
    return [(chr(kind), _statement(kind, body)) for kind, body in Frames(keep=b"PBDC").feed(out)]


def _statement(kind: int, body: bytes) -> bytes:
    if kind == ord("B"):
        return body.split(b"\0")[1]
    if kind in (ord("D"), ord("C")):
        return body[1:].split(b"\0")[0]
    return body.split(b"\0")[0] if kind == ord("P") else b""


def seen(statements: Statements, *answers: bytes) -> list[str]:
    """The answers the driver sees."""
    return [chr(a[0]) for a in answers if not statements.answered(a[0])]


def test_a_named_statement_is_renamed_after_its_content_and_closed_before_it_is_parsed() -> None:
    statements = Statements()
    out = send(statements, parse(b"_pg3_0", b"SELECT $1"), bind(b"_pg3_0"), EXECUTE, SYNC)
    server = out[1][1]
    assert server.startswith(b"pb_") and out == [("C", server), ("P", server), ("B", server), ("E", b""), ("S", b"")]
    # The same query under another driver's name (another process's _pg3_0) is the same statement.
    assert send(Statements(), parse(b"_pg3_7", b"SELECT $1"))[1] == ("P", server)
    assert send(Statements(), parse(b"_pg3_0", b"SELECT $2"))[1] != ("P", server)
    # The driver sees the answers to what it sent: not the Close's.
    assert seen(statements, CLOSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, READY) == ["1", "2", "Z"]


def test_on_a_backend_that_may_not_have_it_a_bind_is_preceded_by_its_parse() -> None:
    statements = Statements()
    send(statements, parse(b"s1", b"SELECT 1"), SYNC)
    seen(statements, CLOSE_COMPLETE, PARSE_COMPLETE, READY)
    assert [kind for kind, _ in send(statements, bind(b"s1"), EXECUTE, SYNC)] == ["B", "E", "S"]  # (known here)
    seen(statements, BIND_COMPLETE, READY)
    statements.new_backend()  # (the next transaction's lease)
    out = send(statements, bind(b"s1"), EXECUTE, bind(b"s1"), EXECUTE, SYNC)
    assert [kind for kind, _ in out] == ["C", "P", "B", "E", "B", "E", "S"]  # (once per group)
    assert seen(statements, CLOSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, BIND_COMPLETE, READY) == ["2", "2", "Z"]


def test_a_parse_an_error_skipped_is_not_taken_for_one_the_backend_has() -> None:
    statements = Statements()
    send(statements, parse(b"s1", b"SELECT 1"), SYNC)
    seen(statements, CLOSE_COMPLETE, PARSE_COMPLETE, READY)
    statements.new_backend()
    send(statements, bind(b"broken"), EXECUTE, bind(b"s1"), EXECUTE, SYNC)
    # The first Bind fails: the server skips the rest of the group, the added Close and Parse too.
    assert seen(statements, message(b"E", b"S"), READY) == ["E", "Z"]
    assert statements.hidden == 0
    assert [kind for kind, _ in send(statements, bind(b"s1"), SYNC)] == ["C", "P", "B", "S"]  # (prepared again)


def test_the_driver_s_close_and_a_deallocate_are_followed() -> None:
    statements = Statements()
    send(statements, parse(b"s1", b"SELECT 1"), SYNC)
    seen(statements, CLOSE_COMPLETE, PARSE_COMPLETE, READY)
    out = send(statements, message(b"C", b"Ss1\0"), SYNC)
    assert out[0][0] == "C" and out[0][1].startswith(b"pb_")  # (the server's name)
    assert seen(statements, CLOSE_COMPLETE, READY) == ["3", "Z"]  # (the driver's own: it sees it)
    assert send(statements, bind(b"s1"), SYNC)[0] == ("B", b"s1")  # (closed: the server says so)
    send(statements, parse(b"s2", b"SELECT 2"), SYNC)
    seen(statements, CLOSE_COMPLETE, PARSE_COMPLETE, READY)
    send(statements, message(b"Q", b"DEALLOCATE ALL\0"))
    seen(statements, message(b"C", b"DEALLOCATE ALL\0"), READY)
    assert [kind for kind, _ in send(statements, bind(b"s2"), SYNC)] == ["C", "P", "B", "S"]
