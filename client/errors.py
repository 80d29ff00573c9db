"""Exceptions a poolbroker client raises; each wire error code maps to exactly one class."""

from __future__ import annotations


class PoolBrokerError(Exception):
    """Base class of every poolbroker error."""

    code = "internal"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class PoolTimeout(PoolBrokerError, TimeoutError):
    """No connection could be leased within the acquire timeout."""

    code = "pool_timeout"


class PoolFull(PoolBrokerError):
    """The pool's waiting queue is full (max_waiting): refused without waiting."""

    code = "pool_full"


class UpstreamUnavailable(PoolBrokerError):
    """The broker could not connect to the upstream; the message carries the connect error."""

    code = "upstream_unavailable"


class UpstreamError(PoolBrokerError):
    """I/O with the leased upstream connection failed (reset, closed mid-read)."""

    code = "upstream_error"


class UpstreamTimeout(UpstreamError, TimeoutError):
    """An I/O operation on the lease did not complete within its timeout; nothing was consumed."""

    code = "upstream_timeout"


class LeaseLost(PoolBrokerError):
    """The lease is unknown to the broker: released, reclaimed, another client's, or the broker restarted."""

    code = "lease_lost"


class LimitExceeded(PoolBrokerError):
    """A request went over one of the broker's limits; the message names the limit."""

    code = "limit_exceeded"


class NotAuthorized(PoolBrokerError):
    """An administrative request from a peer that may not administer this broker."""

    code = "not_authorized"


class BrokerUnavailable(PoolBrokerError):
    """The broker did not answer within the call's timeout, or is shutting down."""

    code = "broker_unavailable"


class ProtocolError(PoolBrokerError):
    """A request or reply broke the wire protocol (malformed, unknown pool or operation, misuse)."""

    code = "bad_request"


# Wire error code -> exception class. Several codes may share a class; each code has one class.
ERROR_CLASSES: dict[str, type[PoolBrokerError]] = {
    "pool_timeout": PoolTimeout,
    "pool_full": PoolFull,
    "upstream_unavailable": UpstreamUnavailable,
    "upstream_error": UpstreamError,
    "upstream_timeout": UpstreamTimeout,
    "lease_lost": LeaseLost,
    "limit_exceeded": LimitExceeded,
    "shutting_down": BrokerUnavailable,
    "bad_request": ProtocolError,
    "unsupported_version": ProtocolError,
    "unknown_pool": ProtocolError,
    "lease_busy": ProtocolError,
    "not_authorized": NotAuthorized,
    "reload_failed": PoolBrokerError,
    "internal": PoolBrokerError,
}


def error_from_code(code: str, message: str) -> PoolBrokerError:
    """The exception for a wire error reply (an unknown code becomes a ProtocolError)."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return ProtocolError(f"unknown error code {code!r}: {message}", code=code)
    return cls(message, code=code)
