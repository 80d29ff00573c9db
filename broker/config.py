"""Broker configuration: defaults, then a TOML file, then environment and flags, checked once."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.endpoint import ENDPOINT_ENV


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """One named pool in front of one upstream address. Durations are float seconds."""

    name: str
    host: str
    port: int
    max_size: int = 10
    max_waiting: int = 10_000
    acquire_timeout: float = 5.0  # for lease requests that carry no timeout of their own
    connect_timeout: float = 5.0
    io_timeout: float = 30.0  # for I/O operations that carry no timeout of their own

    def __post_init__(self) -> None:
        where = f"pool {self.name!r}"
        if not self.name or len(self.name) > 128:
            raise ConfigError("a pool name must be 1 to 128 characters")
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}: port {self.port} is out of range")
        if self.max_size < 1:
            raise ConfigError(f"{where}: max_size must be at least 1")
        if self.max_waiting < 0:
            raise ConfigError(f"{where}: max_waiting must not be negative")
        for name in ("acquire_timeout", "connect_timeout", "io_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}: {name} must be positive")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_LOG_LEVEL = "info"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The whole broker: where it listens and its pools."""

    bind: str | None = None  # None: ipc:// in the private runtime directory
    pools: tuple[PoolConfig, ...] = ()
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE  # bytes; bounds every request and every read
    log_level: str = DEFAULT_LOG_LEVEL

    def __post_init__(self) -> None:
        names = [pool.name for pool in self.pools]
        if len(set(names)) != len(names):
            raise ConfigError("pool names must be unique")
        if self.max_message_size < 1024:
            raise ConfigError("max_message_size must be at least 1024 bytes")


POOL_KEYS = frozenset(f.name for f in dataclasses.fields(PoolConfig)) - {"name", "host", "port"}
POOL_NUMBERS = {f.name: f.type for f in dataclasses.fields(PoolConfig) if f.name in POOL_KEYS}
BROKER_KEYS = frozenset({"bind", "max_message_size", "log_level"})


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"upstream address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse_upstream(text: str) -> tuple[str, str, int]:
    """A --upstream flag, 'NAME=HOST:PORT' -> (name, host, port)."""
    name, sep, address = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--upstream {text!r} is not NAME=HOST:PORT")
    return (name, *parse_address(address))


def _pool_settings(name: str, table: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for key, value in table.items():
        if key == "upstream":
            continue
        if key not in POOL_KEYS:
            raise ConfigError(f"pool {name!r}: unknown key {key!r} (known: {', '.join(sorted(POOL_KEYS))})")
        settings[key] = _number(f"pool {name!r}: {key}", value, POOL_NUMBERS[key])
    return settings


def _number(where: str, value: Any, kind: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number")
    if kind in (int, "int"):
        if not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number")
        return value
    return float(value)


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    bind: str | None = None,
    upstreams: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    log_level: str | None = None,
) -> BrokerConfig:
    """Build the config: defaults < file < $POOLBROKER_ENDPOINT < flags.

    `overrides` are pool settings from flags; they apply to every pool.
    """
    file_broker: dict[str, Any] = {}
    file_pools: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"can't read config {path}: {exc}") from None
        unknown = set(data) - {"broker", "pools"}
        if unknown:
            raise ConfigError(f"{path}: unknown tables {sorted(unknown)} (known: broker, pools)")
        file_broker = data.get("broker", {})
        file_pools = data.get("pools", {})
        bad = set(file_broker) - BROKER_KEYS
        if bad:
            raise ConfigError(f"[broker]: unknown keys {sorted(bad)} (known: {', '.join(sorted(BROKER_KEYS))})")

    pools: dict[str, dict[str, Any]] = {}
    for name, table in file_pools.items():
        if not isinstance(table, dict) or "upstream" not in table:
            raise ConfigError(f'[pools.{name}] needs upstream = "HOST:PORT"')
        host, port = parse_address(str(table["upstream"]))
        pools[name] = {"name": name, "host": host, "port": port, **_pool_settings(name, table)}
    for text in upstreams or []:
        name, host, port = parse_upstream(text)
        pools.setdefault(name, {"name": name}).update(host=host, port=port)
    for settings in pools.values():
        settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not pools:
        raise ConfigError("no pools: give --upstream NAME=HOST:PORT or a config file with [pools.NAME]")

    max_message_size = file_broker.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE)
    return BrokerConfig(
        bind=bind or os.environ.get(ENDPOINT_ENV) or file_broker.get("bind"),
        pools=tuple(PoolConfig(**settings) for settings in pools.values()),
        max_message_size=int(_number("[broker] max_message_size", max_message_size, int)),
        log_level=log_level or file_broker.get("log_level", DEFAULT_LOG_LEVEL),
    )
