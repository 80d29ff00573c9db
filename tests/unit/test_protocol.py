"""Request parsing: every malformed request is a BadRequest with a code, never anything else."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import poolbroker
from poolbroker.client._errors import ERROR_CLASSES, PoolTimeout, ProtocolError, error_from_code
from poolbroker.wire.protocol import VERSION, BadRequest, ErrorCode, parse_request

TOKEN = b"t" * 16


def pack(**fields: Any) -> bytes:
    return msgpack.packb({"v": VERSION, "id": 7, **fields}, use_bin_type=True)


def test_a_lease_with_its_first_exchange_and_release_parses() -> None:
    req = parse_request(
        pack(
            op="lease",
            pool="redis",
            timeout=2,
            tag="t",
            pid=12,
            send=b"PING\r\n",
            read="until",
            delim=b"\r\n",
            release="keep",
        )
    )
    assert (req.op, req.id, req.pool, req.timeout, req.tag, req.pid) == ("lease", 7, "redis", 2.0, "t", 12)
    assert (req.send, req.read, req.delim, req.release, req.has_exchange) == (
        b"PING\r\n",
        "until",
        b"\r\n",
        "keep",
        True,
    )


def test_io_and_release_parse() -> None:
    io = parse_request(pack(op="io", lease=TOKEN, read="exactly", n=5, io_timeout=0.5))
    assert (io.lease, io.read, io.n, io.io_timeout) == (TOKEN, "exactly", 5, 0.5)
    release = parse_request(pack(op="release", lease=TOKEN, noreply=True))
    assert (release.release, release.noreply) == ("keep", True)
    when_done = parse_request(pack(op="io", lease=TOKEN, read="any", n=9, release="when_done"))
    assert (when_done.release, when_done.ends_lease) == ("when_done", False)
    assert parse_request(pack(op="io", lease=TOKEN, read="any", n=9, release="discard")).ends_lease
    ready = parse_request(pack(op="io", lease=TOKEN, read="ready", n=2, poll=True))
    assert (ready.read, ready.n, ready.poll) == ("ready", 2, True)
    assert parse_request(pack(op="cancel", lease=TOKEN)).lease == TOKEN


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"\xc1", "bad_request", "not a msgpack"),
        (msgpack.packb([1, 2]), "bad_request", "a msgpack map"),
        (msgpack.packb({"v": 1, "op": "ping"}), "bad_request", "'id'"),
        (msgpack.packb({"v": 1, "id": True, "op": "ping"}), "bad_request", "'id'"),
        (msgpack.packb({"v": 1, "id": -1, "op": "ping"}), "bad_request", "'id'"),
        (msgpack.packb({"v": 2, "id": 1, "op": "ping"}), "unsupported_version", "version 2"),
        (pack(op="fly"), "bad_request", "unknown operation 'fly'"),
        (pack(op="lease"), "bad_request", "needs a 'pool'"),
        (pack(op="lease", pool=3), "bad_request", "'pool' has the wrong type"),
        (pack(op="lease", pool="p", timeout=-1), "bad_request", "'timeout'"),
        (pack(op="lease", pool="p", timeout=True), "bad_request", "'timeout'"),
        (pack(op="lease", pool="x" * 200), "bad_request", "longer than"),
        (pack(op="io", lease=b"short"), "bad_request", "16-byte 'lease'"),
        (pack(op="io", lease=TOKEN, read="sometimes"), "bad_request", "'read' must be"),
        (pack(op="io", lease=TOKEN, read="any"), "bad_request", "needs 'n' >= 1"),
        (pack(op="io", lease=TOKEN, read="exactly"), "bad_request", "needs 'n'"),
        (pack(op="io", lease=TOKEN, read="until"), "bad_request", "non-empty 'delim'"),
        (pack(op="io", lease=TOKEN, n=4), "bad_request", "need a 'read'"),
        (pack(op="io", lease=TOKEN, read="exactly", n=-1), "bad_request", "not be negative"),
        (pack(op="io", lease=TOKEN, send="text"), "bad_request", "'send' has the wrong type"),
        (pack(op="release", lease=TOKEN, release="maybe"), "bad_request", "'release' must be"),
        (pack(op="release", lease=TOKEN, release="when_done"), "bad_request", "'release' must be"),
        (pack(op="io", lease=TOKEN, read="any", n=1, release="soon"), "bad_request", "'release' must be"),
        (pack(op="ping", noreply=True), "bad_request", "only release may be one-way"),
        (pack(op="io", lease=TOKEN, read="ready"), "bad_request", "read 'ready' needs 'n' >= 1"),
        (pack(op="io", lease=TOKEN, read="exactly", n=3, poll=True), "bad_request", "'poll' is for read"),
        (pack(op="cancel"), "bad_request", "16-byte 'lease'"),
        (pack(op="cancel", lease=TOKEN, noreply=True), "bad_request", "only release may be one-way"),
    ],
)
def test_malformed_requests_get_a_code_and_a_reason(body: bytes, code: str, words: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(body)
    assert caught.value.code == code
    assert words in caught.value.message


def test_the_request_id_is_kept_when_it_could_be_read() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(pack(op="fly"))
    assert caught.value.request_id == 7


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_bad_request(body: bytes) -> None:
    try:
        parse_request(body)
    except BadRequest:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 1, 1, 2, "1", None]),
        "id": st.integers(-5, 2**64 - 1) | msgpack_values,
        "op": st.sampled_from(["ping", "stats", "leases", "lease", "io", "release", "admin", "x"]) | msgpack_values,
        "pool": st.text(max_size=5) | msgpack_values,
        "lease": st.binary(min_size=16, max_size=16) | msgpack_values,
        "timeout": st.floats(allow_nan=True) | msgpack_values,
        "send": st.binary(max_size=8) | msgpack_values,
        "read": st.sampled_from(["any", "exactly", "until"]) | msgpack_values,
        "n": st.integers(-3, 10) | msgpack_values,
        "delim": st.binary(max_size=3) | msgpack_values,
        "release": st.sampled_from(["keep", "discard"]) | msgpack_values,
        "noreply": msgpack_values,
        "action": st.sampled_from(["shutdown", "pause", "resize", "reload", "x"]) | msgpack_values,
        "max_size": st.integers(-1, 5) | msgpack_values,
    },
)


@settings(max_examples=1000)
@given(fields)
def test_any_map_parses_to_a_checked_request_or_bad_request(body: dict[str, Any]) -> None:
    try:
        req = parse_request(msgpack.packb(body, use_bin_type=True))
    except BadRequest as exc:
        assert exc.code in ERROR_CLASSES
        return
    assert isinstance(req.id, int) and 0 <= req.id < 2**63
    if req.op in ("io", "release"):
        assert isinstance(req.lease, bytes) and len(req.lease) == 16
    if req.timeout is not None:
        assert 0 < req.timeout <= 86400
    if req.op == "admin":
        assert req.action in ("shutdown", "pause", "resize", "reload")
        if req.action in ("pause", "resize"):
            assert isinstance(req.pool, str) and req.pool
        if req.action == "resize":
            assert isinstance(req.max_size, int) and req.max_size >= 1


def documented_error_codes() -> dict[str, str]:
    """docs/protocol.md's error table: {code: client exception name}."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    table = text.split("## Error codes", 1)[1].split("\n\n", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", table, re.MULTILINE))


def test_every_error_code_maps_to_one_client_exception() -> None:
    documented = documented_error_codes()
    # The table, the wire's ErrorCode and the client's classes: one set of codes.
    assert len(documented) == 16 and set(documented) == set(ErrorCode) == set(ERROR_CLASSES)
    for code, name in documented.items():
        error = error_from_code(code, "why")
        assert type(error).__name__ == name and error.code == code and str(error) == "why"
        assert type(error) is getattr(poolbroker, name)  # importable from the package, as documented
    assert isinstance(error_from_code("pool_timeout", "late"), PoolTimeout)
    assert isinstance(error_from_code("pool_timeout", "late"), TimeoutError)
    assert isinstance(error_from_code("upstream_timeout", "late"), TimeoutError)
    unknown = error_from_code("made_up", "?")
    assert isinstance(unknown, ProtocolError) and "made_up" in str(unknown)
