"""TLS to the upstream: each pool's client context, built once from its settings."""

from __future__ import annotations

import ssl

from poolbroker.broker.settings import ConfigError, PoolConfig


def client_context(config: PoolConfig) -> ssl.SSLContext | None:
    """The pool's TLS context (certificates verified, host names checked), or None without tls."""
    if not config.tls:
        return None
    try:
        context = ssl.create_default_context(cafile=config.tls_ca_file or None)
        if config.tls_cert_file:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"pool {config.name!r}: can't set up TLS: {exc}") from None
    return context


def server_name(config: PoolConfig) -> str:
    """The name the upstream's certificate must carry (and the SNI sent)."""
    return config.tls_server_name or config.host
