"""HTTP/1.1: a connection may go back to the pool only between a whole response and the next request.

An HTTP connection keeps no session, but it has a place in its stream: a holder that leaves in the
middle of a request or a response (a body it did not read, a request it did not finish) would hand
the next holder the rest. `HttpSession` follows both directions with h11, which knows HTTP's
framing (Content-Length, chunks, HEAD, 1xx, Connection: close): the requests the holder sends are
parsed by a server-role h11 connection, mirrored into a client-role one, which then parses the
responses read back. A client on a socket lease follows its own stream with it too.
"""

from __future__ import annotations

import h11

from poolbroker.sessions.verdict import CLEAN, Verdict, out_of_sync

_DONE_RESPONSE = (h11.Response(status_code=200, headers=[("Content-Length", "0")]), h11.EndOfMessage())


class HttpSession:
    """Where one lease left its connection's HTTP stream (see the module's docstring)."""

    __slots__ = ("_requests", "_responses", "_error")

    def __init__(self) -> None:
        self._requests = h11.Connection(h11.SERVER)  # reads what the holder sends
        self._responses = h11.Connection(h11.CLIENT)  # knows what it asked; reads the answers
        self._error = ""

    def sent(self, data: bytes | memoryview) -> None:
        if self._error or not data:  # (an empty write is no end of stream: h11 would take it for one)
            return
        try:
            self._requests.receive_data(bytes(data))
            self._follow_requests()
        except h11.ProtocolError as exc:
            self._error = f"the request is not HTTP/1.1 h11 can follow: {exc}"

    def received(self, data: bytes) -> None:
        if self._error or not data:
            return
        try:
            self._responses.receive_data(data)
            self._follow_responses()
        except h11.ProtocolError as exc:
            self._error = f"the response is not HTTP/1.1 h11 can follow: {exc}"

    def _follow_requests(self) -> None:
        requests, responses = self._requests, self._responses
        while True:
            event = requests.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:  # PAUSED: the next one waits its turn
                return
            if isinstance(event, h11.Request):
                responses.send(h11.Request(method=event.method, target=event.target, headers=event.headers))
            elif isinstance(event, h11.Data | h11.EndOfMessage):
                responses.send(event)
            elif isinstance(event, h11.ConnectionClosed):
                return

    def _follow_responses(self) -> None:
        requests, responses = self._requests, self._responses
        while True:
            event = responses.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.EndOfMessage) and responses.our_state is h11.DONE:
                # A whole exchange: both sides start their next cycle (a Connection: close on
                # either side makes start_next_cycle refuse, and the connection is not reusable).
                for done in _DONE_RESPONSE:
                    requests.send(done)
                requests.start_next_cycle()
                responses.start_next_cycle()
                self._follow_requests()  # a request sent before this response ended
            elif isinstance(event, h11.ConnectionClosed):
                return

    def verdict(self) -> Verdict:
        if self._error:
            return out_of_sync(self._error)
        requests, responses = self._requests, self._responses
        if requests.their_state is not h11.IDLE or requests.trailing_data[0]:
            return out_of_sync("a request was left unfinished or unanswered")
        if responses.our_state is not h11.IDLE or responses.their_state is not h11.IDLE:
            return out_of_sync("a response was left unread")
        return CLEAN, ""
