"""What both sides of poolbroker share, and neither owns: the wire format (protocol), PostgreSQL's
framing (pgwire), where the broker listens by default (endpoint) and the CURVE key files (keys).
The client and the broker import these; these import neither."""
