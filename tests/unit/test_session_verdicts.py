"""What a holder leaves on a connection, as each protocol judges it when the lease ends (pure)."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolbroker.broker.decide.probes import LineCheck, ProbeFailed
from poolbroker.broker.decide.protocols import CLOSE, KEEP, RUN_RESET, pool_protocol
from poolbroker.broker.settings import ConfigError, PoolConfig
from poolbroker.sessions import Outcome, report
from poolbroker.sessions.http import HttpSession
from poolbroker.sessions.redis import RedisSession
from poolbroker.sessions.resp import RespReader, encode_command
from poolbroker.sessions.verdict import CLEAN, OUT_OF_SYNC, RESET
from poolbroker.wire.protocol import SESSION_CLEAN, SESSION_OUT_OF_SYNC, SESSION_RESET, SESSION_VERDICTS

OK = b"+OK\r\n"


def session_after(sent: list[bytes], received: list[bytes]) -> RedisSession:
    session = RedisSession()
    for data in sent:
        session.sent(data)
    for data in received:
        session.received(data)
    return session


def outcome(session: RedisSession | HttpSession) -> object:
    return session.verdict()[0]


def test_reads_commands_and_keeps_their_names() -> None:
    reader = RespReader(commands=True)
    reader.feed(encode_command("SET", "k", "v") + b"client setname x\r\n" + encode_command("GET", "k"))
    assert reader.values == 3 and not reader.partial
    assert reader.heads == [(b"SET", b"k"), (b"client", b"setname"), (b"GET", b"k")]


def test_skips_a_large_value_fed_in_pieces_without_keeping_it() -> None:
    reader = RespReader(commands=True)
    command = encode_command("SET", "big", b"x" * 1_000_000)
    for start in range(0, len(command), 65536):
        reader.feed(command[start : start + 65536])
        assert len(reader._pending) < 100  # the value is skipped, not buffered
    assert reader.values == 1 and reader.heads == [(b"SET", b"big")] and not reader.partial


def test_counts_nested_and_resp3_replies() -> None:
    reader = RespReader(commands=False)
    replies = [
        b"+OK\r\n",
        b"-ERR no\r\n",
        b":12\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"*0\r\n",
        b"*2\r\n$3\r\nfoo\r\n*2\r\n:1\r\n$0\r\n\r\n",
        b"%1\r\n+key\r\n~2\r\n:1\r\n#t\r\n",
        b"_\r\n",
        b",1.5\r\n",
        b"=8\r\ntxt:abcd\r\n",
    ]
    reader.feed(b"".join(replies))
    assert reader.values == len(replies) and not reader.partial and not reader.error


@given(st.data())
def test_any_split_of_a_stream_reads_the_same(data: st.DataObject) -> None:
    values = [
        encode_command("SET", "k", b"\r\n*$" * data.draw(st.integers(0, 30))),
        b"PING\r\n",
        encode_command("CLIENT", "SETNAME", "a"),
        b"\r\n",
        encode_command("MULTI"),
    ]
    stream = b"".join(data.draw(st.lists(st.sampled_from(values), max_size=8)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    whole, pieces = RespReader(commands=True), RespReader(commands=True)
    whole.feed(stream)
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        pieces.feed(stream[start:end])
    assert (pieces.values, pieces.heads, pieces.partial) == (whole.values, whole.heads, False)


def test_not_resp_fails_the_reader_for_good() -> None:
    reader = RespReader(commands=False)
    reader.feed(b"?what\r\n")
    assert reader.error
    reader.feed(b"+OK\r\n")
    assert reader.values == 0


def test_a_plain_command_with_its_reply_read_needs_nothing() -> None:
    session = session_after([encode_command("INCR", "n"), encode_command("GET", "n")], [b":1\r\n", b"$1\r\n1\r\n"])
    assert session.verdict() == (CLEAN, "")


@pytest.mark.parametrize(
    "commands",
    [
        [("SELECT", "3")],
        [("AUTH", "user", "pw")],
        [("HELLO", "3")],
        [("CLIENT", "SETNAME", "holder-a")],
        [("client", "tracking", "on")],
        [("CLIENT", "REPLY", "SKIP")],
        [("MULTI",)],
        [("WATCH", "k")],
        [("MULTI",), ("SET", "k", "v"), ("WATCH", "k")],
        [("READONLY",)],
    ],
)
def test_a_command_that_changes_the_session_calls_for_the_reset(commands: list[tuple[str, ...]]) -> None:
    session = session_after([encode_command(*c) for c in commands], [OK] * len(commands))
    assert outcome(session) is RESET


@pytest.mark.parametrize(
    "commands",
    [
        [("MULTI",), ("SET", "k", "v"), ("EXEC",)],
        [("MULTI",), ("DISCARD",)],
        [("WATCH", "k"), ("UNWATCH",)],
        [("WATCH", "k"), ("MULTI",), ("EXEC",)],
        [("CLIENT", "GETNAME")],
        [("CLIENT", "ID")],
    ],
)
def test_a_transaction_or_watch_that_ended_leaves_nothing(commands: list[tuple[str, ...]]) -> None:
    session = session_after([encode_command(*c) for c in commands], [OK] * len(commands))
    assert outcome(session) is CLEAN


def test_subscribing_calls_for_the_reset_even_with_messages_unasked_for() -> None:
    sent = [encode_command("SUBSCRIBE", "a", "b")]
    confirmations = [b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n", b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"]
    assert outcome(session_after(sent, confirmations)) is RESET


def test_a_stream_left_in_the_middle_is_out_of_sync() -> None:
    half_sent = session_after([encode_command("SET", "k", "value")[:-3]], [])
    assert half_sent.verdict() == (OUT_OF_SYNC, "a command was left half sent")
    unread = session_after([encode_command("GET", "a"), encode_command("GET", "b")], [b"$-1\r\n"])
    assert unread.verdict() == (OUT_OF_SYNC, "1 of 2 replies not read")
    half_read = session_after([encode_command("GET", "a")], [b"$5\r\nhel"])
    assert half_read.verdict() == (OUT_OF_SYNC, "a reply was left half read")
    garbage = session_after([b"*x\r\n"], [])
    assert outcome(garbage) is OUT_OF_SYNC


def http(method: str, target: str = "/", body: bytes = b"", close: bool = False) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "h"), ("Content-Length", str(len(body)))]
    if close:
        headers.append(("Connection", "close"))
    return (
        b"".join(conn.send(event) or b"" for event in (h11.Request(method=method, target=target, headers=headers),))
        + body
    )


def response(body: bytes, *, chunked: bool = False) -> bytes:
    if chunked:
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_http_whole_exchanges_leave_the_connection_reusable() -> None:
    session = HttpSession()
    session.sent(http("POST", "/a", b"payload"))
    session.received(response(b"one")[:10])
    session.received(response(b"one")[10:])
    session.sent(http("GET", "/b"))
    session.received(response(b"two", chunked=True))
    session.sent(http("HEAD", "/c"))
    session.sent(b"")  # (an empty write, as httpcore makes: no end of the stream)
    session.received(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")  # HEAD: no body follows
    assert session.verdict() == (CLEAN, "")


def test_http_left_in_the_middle_or_closing_is_out_of_sync() -> None:
    unread_body = HttpSession()
    unread_body.sent(http("GET"))
    unread_body.received(response(b"0123456789")[:-4])
    assert outcome(unread_body) is OUT_OF_SYNC
    unanswered = HttpSession()
    unanswered.sent(http("GET"))
    assert outcome(unanswered) is OUT_OF_SYNC
    half_request = HttpSession()
    half_request.sent(http("POST", body=b"0123456789")[:-3])
    assert outcome(half_request) is OUT_OF_SYNC
    closing = HttpSession()
    closing.sent(http("GET", close=True))
    closing.received(response(b"bye"))
    assert outcome(closing) is OUT_OF_SYNC  # the server will close it: not reusable
    not_http = HttpSession()
    not_http.sent(b"\x00\x01 not http\r\n\r\n")
    assert outcome(not_http) is OUT_OF_SYNC


def pool(**settings: object) -> PoolConfig:
    return PoolConfig(name="p", host="h", port=1, **settings)  # type: ignore[arg-type]


def test_the_protocol_chooses_probe_handshake_and_reset() -> None:
    redis = pool_protocol(pool(protocol="redis", password="s3 cret", username="app", db=3, client_name="web"))
    steps = [
        encode_command("AUTH", "app", "s3 cret"),
        encode_command("SELECT", "3"),
        encode_command("CLIENT", "SETNAME", "web"),
    ]
    # A new connection: RESET first (a server without it fails here, saying so), PING last (a
    # Redis still loading answers -LOADING); the reset: RESET, then the steps again.
    assert [check.request for check in redis.handshake] == [  # type: ignore[attr-defined]
        encode_command("RESET"),
        *steps,
        encode_command("PING"),
    ]
    assert [check.request for check in redis.reset] == [encode_command("RESET"), *steps]  # type: ignore[attr-defined]
    assert redis.pipelined and redis.protects and pool(protocol="redis").probe == "redis"
    assert pool(protocol="memcached").probe == "memcached" and pool(protocol="http").probe == "http"
    assert pool(protocol="redis", probe="tcp").probe == "tcp"  # an override
    tcp = pool_protocol(pool())
    assert (tcp.handshake, tcp.reset, tcp.new_session, tcp.protects) == ((), (), None, False)
    assert pool_protocol(pool(protocol="memcached")).protects


def test_the_reset_runs_only_when_the_session_changed() -> None:
    redis = pool_protocol(pool(protocol="redis"))
    plain = session_after([encode_command("INCR", "n")], [b":1\r\n"])
    assert redis.on_return(plain).action == KEEP
    selected = session_after([encode_command("SELECT", "3")], [OK])
    assert redis.on_return(selected).action == RUN_RESET
    half = session_after([b"*2\r\n$3\r\nGET\r\n"], [])
    assert (redis.on_return(half).action, redis.on_return(half).reason) == (CLOSE, "out_of_sync")
    off = pool_protocol(pool(protocol="redis", reset="off"))
    assert off.on_return(selected).action == KEEP and not off.protects
    assert off.on_return(half).action == CLOSE  # out of step: never handed on, reset or not
    discard = pool_protocol(pool(protocol="redis", reset="discard"))
    assert discard.on_return(plain).reason == "reset"
    steps = pool_protocol(pool(reset=(("RESET\r\n", "+RESET"),)))
    assert steps.on_return(None).action == RUN_RESET and steps.protects  # a pool's own steps: every time
    assert isinstance(steps.reset[0], LineCheck)


def test_redis_settings_need_the_redis_protocol() -> None:
    from poolbroker.broker.settings import ConfigError

    with pytest.raises(ConfigError, match='db need protocol = "redis"'):
        pool(db=2)
    with pytest.raises(ConfigError, match="on_connect steps or password"):
        pool(protocol="redis", password="x", on_connect=(("AUTH x\r\n", "+OK"),))
    with pytest.raises(ConfigError, match="username needs a password"):
        pool(protocol="redis", username="u")
    with pytest.raises(ConfigError, match="protocol 'pg' is not one of"):
        pool(protocol="pg")


def test_a_conversation_is_over_when_every_command_is_answered_and_nothing_is_left() -> None:
    redis = pool_protocol(pool(protocol="redis"))
    incr = encode_command("INCR", "n")
    assert redis.conversation_over(session_after([incr], [b":1\r\n"]))
    assert not redis.conversation_over(session_after([incr, incr], [b":1\r\n"]))  # a reply to come
    assert not redis.conversation_over(session_after([incr], [b":1"]))  # half a reply
    for command in (("WATCH", "n"), ("MULTI",), ("SELECT", "2"), ("SUBSCRIBE", "c")):
        assert not redis.conversation_over(session_after([encode_command(*command)], [b"+OK\r\n"]))
    multi = [encode_command("MULTI"), incr, encode_command("EXEC")]
    assert redis.conversation_over(session_after(multi, [b"+OK\r\n+QUEUED\r\n*1\r\n:2\r\n"]))
    http = pool_protocol(pool(protocol="http"))
    exchange = HttpSession()
    exchange.sent(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not http.conversation_over(exchange)  # the response is still to come
    exchange.received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert http.conversation_over(exchange)
    # A pool that follows no stream can't tell: its leases never end early.
    assert not pool_protocol(pool(protocol="tcp")).conversation_over(None)


def test_resp3_pushes_are_not_answers_and_attributes_precede_theirs() -> None:
    # A GET answered after a tracking invalidation (a push) and with an attribute before its reply:
    # one answer for one command, so the conversation is over.
    session = session_after(
        [encode_command("GET", "k")],
        [b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n", b"|1\r\n+ttl\r\n:3\r\n", b"$1\r\nv\r\n"],
    )
    assert session.verdict() == (CLEAN, "")
    assert pool_protocol(pool(protocol="redis")).conversation_over(session)
    unanswered = session_after([encode_command("GET", "k")], [b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"])
    assert unanswered.verdict()[0] is OUT_OF_SYNC  # (the push is no answer to the GET)


def test_a_resp3_pool_says_hello_3_after_auth_and_reads_its_map_whole() -> None:
    protocol = pool_protocol(pool(protocol="redis", password="pw", resp=3))
    steps = [check.request for check in protocol.handshake]  # type: ignore[attr-defined]
    assert steps[1:3] == [encode_command("AUTH", "pw"), encode_command("HELLO", "3")]
    hello = protocol.handshake_run()[2]
    answer = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n+PONG\r\n"
    buf = bytearray(answer[:20])
    assert hello.read(buf) is False  # (not all there yet)
    buf += answer[20:]
    assert hello.read(buf) is True and buf == b"+PONG\r\n"  # (the next step's answer is left)
    with pytest.raises(ProbeFailed, match="set resp = 2"):
        hello.read(bytearray(b"-ERR unknown command 'HELLO'\r\n"))
    with pytest.raises(ConfigError, match="resp must be 2 or 3"):
        pool(protocol="redis", resp=4)
    with pytest.raises(ConfigError, match='resp need protocol = "redis"'):
        pool(resp=3)


@pytest.mark.parametrize(
    ("settings", "reported", "action"),
    [
        ({"protocol": "redis"}, None, RUN_RESET),  # (nothing reported: unknown, so reset)
        ({"protocol": "redis"}, "clean", KEEP),
        ({"protocol": "redis"}, "reset", RUN_RESET),
        ({"protocol": "redis"}, "out_of_sync", CLOSE),
        ({"protocol": "redis", "reset": "off"}, None, KEEP),  # (the pool's own choice)
        ({"protocol": "redis", "reset": "discard"}, "clean", CLOSE),
        ({"protocol": "postgres", "username": "u"}, "clean", RUN_RESET),  # (session mode: every return)
        ({"protocol": "postgres", "username": "u", "pool_mode": "transaction"}, "clean", KEEP),
        ({"protocol": "postgres", "username": "u", "pool_mode": "transaction"}, None, RUN_RESET),
        ({"protocol": "http"}, None, CLOSE),  # (no reset can prove its stream in step)
        ({"protocol": "http"}, "clean", KEEP),
        ({"protocol": "memcached"}, None, KEEP),  # (memcached keeps no session)
        ({"protocol": "tcp"}, None, KEEP),
    ],
)
def test_a_lent_socket_s_return_goes_by_what_its_client_reports(
    settings: dict[str, str], reported: str | None, action: str
) -> None:
    protocol = pool_protocol(PoolConfig("p", "h", 1, **settings))  # type: ignore[arg-type]
    assert protocol.on_lent_return(reported).action == action


def test_a_client_reports_a_verdict_in_the_wire_s_own_words() -> None:
    """A socket lease's client follows its stream with the relay's own code and says the outcome
    in its release: the outcomes are named as the wire's `session` values."""
    assert {outcome.value for outcome in Outcome} == SESSION_VERDICTS
    assert report(session_after([encode_command("INCR", "n")], [b":1\r\n"])) == SESSION_CLEAN
    assert report(session_after([encode_command("SELECT", "1")], [OK])) == SESSION_RESET
    assert report(session_after([encode_command("GET", "k")], [])) == SESSION_OUT_OF_SYNC
