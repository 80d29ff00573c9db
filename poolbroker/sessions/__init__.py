"""What a holder leaves on a connection, judged from the bytes of its stream (pure: no sockets,
no clocks). The broker's relay follows each lease's stream with these; a client that holds a lent
socket follows its own with the same code, and reports the verdict in its release."""

from poolbroker.sessions.verdict import CLEAN, OUT_OF_SYNC, RESET, Outcome, Session, Stateless, Verdict, report

__all__ = ["CLEAN", "OUT_OF_SYNC", "RESET", "Outcome", "Session", "Stateless", "Verdict", "report"]
