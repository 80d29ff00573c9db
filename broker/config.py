"""Loading the broker's settings (settings.py): defaults, then a TOML file, then environment and
flags, checked once; a pool's password read from its file or variable at start and each reload."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from poolbroker.broker.settings import (
    BROKER_KEYS,
    BROKER_STRINGS,
    DEFAULT_LOG_LEVEL,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MAX_WAITING_PAYLOAD,
    DEFAULT_SHUTDOWN_GRACE,
    POOL_KEYS,
    POOL_SETTINGS,
    REPLY_OVERHEAD,
    RESET_MODES,
    BrokerConfig,
    ClusterConfig,
    ConfigError,
    PoolConfig,
    Step,
    connection_name,
    parse_address,
    parse_upstream,
)
from poolbroker.wire.endpoint import ENDPOINT_ENV

MAX_APPLICATION_NAME = 63  # PostgreSQL's NAMEDATALEN - 1: a longer one is cut, and would not be fenced


def _pool_settings(name: str, table: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for key, value in table.items():
        where = f"pool {name!r}: {key}"
        if key == "upstream":
            continue
        if key not in POOL_KEYS:
            raise ConfigError(f"pool {name!r}: unknown key {key!r} (known: {', '.join(sorted(POOL_KEYS))})")
        if key == "reset" and isinstance(value, str):
            if value not in RESET_MODES:
                raise ConfigError(f'{where} must be "auto", "off", "discard" or a list of {{send, expect}} steps')
            settings[key] = value
        elif key in ("on_connect", "reset"):
            settings[key] = _steps(where, value)
        else:
            settings[key] = _typed(where, value, POOL_SETTINGS[key].type)
    return settings


def _read_password(settings: dict[str, Any]) -> None:
    """A pool's password from password_file or password_env, read now (at start and each reload)."""
    where = f"pool {settings['name']!r}"
    sources = [key for key in ("password", "password_file", "password_env") if settings.get(key)]
    if len(sources) > 1:
        raise ConfigError(f"{where}: give one of {', '.join(sources)}")
    if settings.get("password_file"):
        try:
            settings["password"] = Path(settings["password_file"]).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{where}: can't read password_file: {exc}") from None
        if not settings["password"]:
            raise ConfigError(f"{where}: password_file {settings['password_file']} is empty")
    elif settings.get("password_env"):
        name = settings["password_env"]
        if not os.environ.get(name):
            raise ConfigError(f"{where}: password_env names ${name}, which is not set or empty")
        settings["password"] = os.environ[name]


def _steps(where: str, value: Any) -> tuple[Step, ...]:
    """[{send = "...", expect = "..."}, ...] -> ((send, expect), ...)."""
    if not isinstance(value, list):
        raise ConfigError(f'{where} must be a list of {{send = "...", expect = "..."}} steps')
    steps = []
    for number, step in enumerate(value, 1):
        if not isinstance(step, dict) or set(step) != {"send", "expect"}:
            raise ConfigError(f'{where}: step {number} must be {{send = "...", expect = "..."}}')
        if not all(isinstance(step[key], str) and step[key] for key in ("send", "expect")):
            raise ConfigError(f"{where}: step {number}: send and expect must be non-empty strings")
        steps.append((step["send"], step["expect"]))
    return tuple(steps)


def _typed(where: str, value: Any, kind: Any) -> str | int | float | bool:
    if kind in (bool, "bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if kind in (str, "str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
        return value
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
    shutdown_grace: float | None = None,
    broker_overrides: dict[str, Any] | None = None,
) -> BrokerConfig:
    """Build the config: defaults < file < $POOLBROKER_ENDPOINT < flags.

    `overrides` are pool settings from flags; they apply to every pool. `broker_overrides` are
    [broker] keys from flags (None: not given).
    """
    file_broker: dict[str, Any] = {}
    file_pools: dict[str, Any] = {}
    cluster: ClusterConfig | None = None
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"can't read config {path}: {exc}") from None
        unknown = set(data) - {"broker", "pools", "cluster"}
        if unknown:
            raise ConfigError(f"{path}: unknown tables {sorted(unknown)} (known: broker, pools, cluster)")
        if "cluster" in data:
            cluster = _cluster(data["cluster"])
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
        _read_password(settings)
    if not pools:
        raise ConfigError("no pools: give --upstream NAME=HOST:PORT or a config file with [pools.NAME]")

    given = {**file_broker, **{k: v for k, v in (broker_overrides or {}).items() if v is not None}}
    strings = {key: str(_typed(f"[broker] {key}", given[key], str)) for key in BROKER_STRINGS if key in given}
    max_message_size = int(
        _typed("[broker] max_message_size", given.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE), int)
    )
    # Unless given, max_payload follows a smaller max_message_size down.
    max_payload = given.get("max_payload", min(DEFAULT_MAX_PAYLOAD, max_message_size - REPLY_OVERHEAD))
    max_payload = int(_typed("[broker] max_payload", max_payload, int))
    # Unless given, max_waiting_payload follows a larger max_payload up.
    max_waiting_payload = given.get("max_waiting_payload", max(DEFAULT_MAX_WAITING_PAYLOAD, max_payload))
    if cluster is not None:
        for settings in pools.values():
            _name_for_fencing(settings, cluster.name)
    return BrokerConfig(
        overridden=_overridden(path, file_pools, file_broker, overrides, broker_overrides),
        cluster=cluster,
        bind=bind or os.environ.get(ENDPOINT_ENV) or given.get("bind"),
        pools=tuple(PoolConfig(**settings) for settings in pools.values()),
        max_message_size=max_message_size,
        max_payload=max_payload,
        max_waiting_payload=int(_typed("[broker] max_waiting_payload", max_waiting_payload, int)),
        log_level=log_level or given.get("log_level", DEFAULT_LOG_LEVEL),
        shutdown_grace=(
            shutdown_grace
            if shutdown_grace is not None
            else float(_typed("[broker] shutdown_grace", given.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE), float))
        ),
        **strings,
    )


def _name_for_fencing(settings: dict[str, Any], broker: str) -> None:
    """A shared pool's connections carry this broker's name (Redis CLIENT SETNAME, PostgreSQL's
    application_name), by which another broker fences them if this one is lost (decide/fence.py)."""
    if not settings.get("cluster_max_size") or settings.get("protocol") not in ("redis", "postgres"):
        return
    name = connection_name(settings.get("client_name", ""), broker)
    if settings["protocol"] == "postgres" and len(name) > MAX_APPLICATION_NAME:
        raise ConfigError(f"pool {settings['name']!r}: application_name {name!r} is over {MAX_APPLICATION_NAME} bytes")
    settings["client_name"] = name


def _cluster(table: Any) -> ClusterConfig:
    """[cluster]: etcd = ["http://HOST:PORT", ...], name = "...", ttl = SECONDS."""
    if not isinstance(table, dict):
        raise ConfigError("[cluster] must be a table")
    if unknown := set(table) - {"etcd", "name", "ttl"}:
        raise ConfigError(f"[cluster]: unknown keys {sorted(unknown)} (known: etcd, name, ttl)")
    if "etcd" not in table or "name" not in table:
        raise ConfigError('[cluster] needs etcd = ["http://HOST:PORT", ...] and name = "..."')
    etcd = table["etcd"]
    if not isinstance(etcd, list) or not all(isinstance(url, str) for url in etcd):
        raise ConfigError('[cluster] etcd must be a list of URLs: ["http://HOST:PORT", ...]')
    name = _typed("[cluster] name", table["name"], str)
    ttl = _typed("[cluster] ttl", table.get("ttl", 10), int)
    return ClusterConfig(etcd=tuple(etcd), name=str(name), ttl=int(ttl))


def _overridden(
    path: str | os.PathLike[str] | None,
    file_pools: dict[str, Any],
    file_broker: dict[str, Any],
    overrides: dict[str, Any] | None,
    broker_overrides: dict[str, Any] | None,
) -> tuple[str, ...]:
    """A line per setting that both the file and a flag give: the flag wins (at every reload too),
    which a user who edits the file and reloads would not otherwise know."""
    lines = []
    for name, value in (overrides or {}).items():
        given_in = sorted(pool for pool, table in file_pools.items() if name in table)
        if value is not None and given_in:
            flag = f"--{name.replace('_', '-')} {value}"
            lines.append(f"{flag} overrides {name} in {path} for pool(s) {', '.join(given_in)}")
    for name, value in (broker_overrides or {}).items():
        if value is not None and name in file_broker:
            lines.append(f"--{name.replace('_', '-')} {value} overrides [broker] {name} in {path}")
    return tuple(lines)
