"""Exceptions a poolbroker client raises; each wire error code maps to exactly one class."""

from __future__ import annotations

from poolbroker.wire.protocol import ErrorCode


class PoolBrokerError(Exception):
    """Base class of every poolbroker error."""

    code: str = ErrorCode.INTERNAL  # the wire's code (BrokerUnavailable's is the client's own)

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class PoolTimeout(PoolBrokerError, TimeoutError):
    """No connection could be leased within the acquire timeout."""

    code = ErrorCode.POOL_TIMEOUT


class PoolFull(PoolBrokerError):
    """The pool's waiting queue is full (max_waiting): refused without waiting."""

    code = ErrorCode.POOL_FULL


class UpstreamUnavailable(PoolBrokerError):
    """The broker could not connect to the upstream; the message carries the connect error."""

    code = ErrorCode.UPSTREAM_UNAVAILABLE


class UpstreamError(PoolBrokerError):
    """I/O with the leased upstream connection failed (reset, closed mid-read)."""

    code = ErrorCode.UPSTREAM_ERROR


class UpstreamTimeout(UpstreamError, TimeoutError):
    """An I/O operation on the lease did not complete within its timeout; nothing was consumed."""

    code = ErrorCode.UPSTREAM_TIMEOUT


class LeaseLost(PoolBrokerError):
    """The lease is unknown to the broker: released, reclaimed, another client's, or the broker restarted."""

    code = ErrorCode.LEASE_LOST


class LimitExceeded(PoolBrokerError):
    """A request went over one of the broker's limits; the message names the limit."""

    code = ErrorCode.LIMIT_EXCEEDED


class NotLent(PoolBrokerError):
    """A socket lease that can't be had: over tcp (another host), or from a pool that does not lend
    (TLS, lend_sockets = false). The relay's leases still serve: adapters fall back to them."""

    code = ErrorCode.NOT_LENT


class NotAuthorized(PoolBrokerError):
    """An administrative request from a peer that may not administer this broker."""

    code = ErrorCode.NOT_AUTHORIZED


class BrokerUnavailable(PoolBrokerError):
    """The broker did not answer within the call's timeout, or is shutting down."""

    code = "broker_unavailable"


class PoolMismatch(PoolBrokerError, ValueError):
    """The broker's pool does not speak what an adapter needs: the message names the setting."""

    code = "pool_mismatch"  # (the client's own: found in the pool's description, not on the wire)


class ProtocolError(PoolBrokerError):
    """A request or reply broke the wire protocol (malformed, unknown pool or operation, misuse)."""

    code = ErrorCode.BAD_REQUEST


# Wire error code -> exception class. Several codes may share a class; each code has one class.
ERROR_CLASSES: dict[ErrorCode, type[PoolBrokerError]] = {
    ErrorCode.POOL_TIMEOUT: PoolTimeout,
    ErrorCode.POOL_FULL: PoolFull,
    ErrorCode.UPSTREAM_UNAVAILABLE: UpstreamUnavailable,
    ErrorCode.UPSTREAM_ERROR: UpstreamError,
    ErrorCode.UPSTREAM_TIMEOUT: UpstreamTimeout,
    ErrorCode.LEASE_LOST: LeaseLost,
    ErrorCode.LIMIT_EXCEEDED: LimitExceeded,
    ErrorCode.NOT_LENT: NotLent,
    ErrorCode.SHUTTING_DOWN: BrokerUnavailable,
    ErrorCode.BAD_REQUEST: ProtocolError,
    ErrorCode.UNSUPPORTED_VERSION: ProtocolError,
    ErrorCode.UNKNOWN_POOL: ProtocolError,
    ErrorCode.LEASE_BUSY: ProtocolError,
    ErrorCode.NOT_AUTHORIZED: NotAuthorized,
    ErrorCode.RELOAD_FAILED: PoolBrokerError,
    ErrorCode.INTERNAL: PoolBrokerError,
}


def error_from_code(code: str, message: str) -> PoolBrokerError:
    """The exception for a wire error reply (an unknown code becomes a ProtocolError)."""
    try:
        cls = ERROR_CLASSES[ErrorCode(code)]
    except ValueError:
        return ProtocolError(f"unknown error code {code!r}: {message}", code=code)
    return cls(message, code=code)
