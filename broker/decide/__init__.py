"""Decisions, pure: the pool core, the holder and lease tables, one exchange, an upstream
connection's states, probes, and what each protocol means. No sockets, no clock reads, no logging:
they are given `now` and return what to do."""
