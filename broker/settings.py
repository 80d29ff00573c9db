"""The broker's settings: plain, frozen dataclasses that check themselves when made, their
defaults, and what each pool setting means (for --help and errors). Pure: loading them from a
file, the environment and flags is config.py's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


PROBES = ("tcp", "send", "redis", "memcached", "http", "postgres")
PROTOCOLS = ("tcp", "redis", "memcached", "http", "postgres")
# A pool's probe unless it names one: its protocol's own round trip.
PROTOCOL_PROBES = {"tcp": "tcp", "redis": "redis", "memcached": "memcached", "http": "http", "postgres": "postgres"}
# reset: "auto" runs the protocol's reset when the holder changed the session; "off" never resets;
# "discard" closes every returned connection; a list of steps runs on every clean return.
RESET_AUTO = "auto"
RESET_OFF = "off"
RESET_DISCARD = "discard"
RESET_MODES = (RESET_AUTO, RESET_OFF, RESET_DISCARD)
# pool_mode (postgres): "session" resets every returned connection; "transaction" keeps one at rest
# between transactions as it is, and resets only what the broker saw the holder leave.
POOL_MODES = ("session", "transaction")
# The settings of a session the broker logs in to, by protocol (the password's sources included).
SESSION_KEYS = {
    "redis": ("username", "password", "password_file", "password_env", "db", "client_name", "resp"),
    "postgres": ("username", "password", "password_file", "password_env", "database", "client_name", "pool_mode"),
}


def _setting(default: Any, help: str) -> Any:
    """A pool setting: its default and the one line that explains it (for --help and errors)."""
    return field(default=default, metadata={"help": help})


def _file_setting(default: Any, help: str) -> Any:
    """A pool setting for the config file only (no flag), kept out of reprs: it may hold a password."""
    return field(default=default, repr=False, metadata={"help": help, "file_only": True})


Step = tuple[str, str]  # (send, expect): send the text, then one line must start with expect


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """One named pool in front of one upstream address. Durations are float seconds; for
    idle_timeout, max_lifetime, check_interval and the lease limits, 0 turns the feature off."""

    name: str
    host: str
    port: int
    max_size: int = _setting(10, "connections per pool, open or opening, at most")
    min_idle: int = _setting(0, "idle connections kept ready (opened at start and after losses)")
    max_waiting: int = _setting(10_000, "requests that may wait for a busy pool before refusal")
    acquire_timeout: float = _setting(5.0, "seconds a lease request waits, if it gives no timeout")
    connect_timeout: float = _setting(5.0, "seconds to open an upstream connection")
    connect_backoff: float = _setting(0.1, "first delay before retrying a failed connect (doubles each time)")
    connect_backoff_max: float = _setting(5.0, "longest delay between connect retries")
    io_timeout: float = _setting(30.0, "seconds an I/O operation waits, if it gives no timeout")
    idle_timeout: float = _setting(600.0, "close connections idle this long, down to min_idle (0: never)")
    max_lifetime: float = _setting(3600.0, "close connections this old, less up to 5% jitter (0: never)")
    check_idle_after: float = _setting(0.5, "probe a connection idle this long before handing it out")
    check_interval: float = _setting(30.0, "probe idle connections this often (0: never)")
    protocol: str = _setting("tcp", "what the upstream speaks (its probe, handshake, reset): " + ", ".join(PROTOCOLS))
    probe: str = _setting("", "how to check a connection: " + ", ".join(PROBES))
    probe_send: str = _setting("", "probe=send: bytes to send; probe=http: the request line")
    probe_expect: str = _setting("", "probe=send: the reply starts with this; probe=http: the status does")
    probe_timeout: float = _setting(1.0, "seconds a probe's answer may take")
    leak_warning_after: float = _setting(30.0, "log a warning naming the holder of a lease held this long (0: never)")
    lease_idle_timeout: float = _setting(120.0, "reclaim a lease with no I/O for this long (0: never)")
    max_lease_time: float = _setting(3600.0, "reclaim a lease held this long, busy or not (0: never)")
    max_leases_per_client: int = _setting(0, "leases one client process may hold or wait for (0: up to max_size)")
    lend_sockets: bool = _setting(
        True, "lend the upstream socket itself to same-host clients that ask (ipc only; never with tls)"
    )
    tls: bool = _setting(False, "speak TLS to the upstream (verified against tls_ca_file, else the system's CAs)")
    tls_ca_file: str = _setting("", "CA certificates (PEM) that the upstream's certificate must chain to")
    tls_server_name: str = _setting("", "the name the upstream's certificate must carry (default: its host)")
    tls_cert_file: str = _setting("", "a client certificate (PEM) for upstreams that ask for one")
    tls_key_file: str = _setting("", "the client certificate's key (PEM), if not in tls_cert_file")
    username: str = _setting("", "redis: the user to AUTH as; postgres: the user to log in as")
    password: str = _file_setting("", "redis, postgres: the password (or password_file, password_env)")
    password_file: str = _setting("", "redis, postgres: a file holding the password (read at start and reload)")
    password_env: str = _setting("", "redis, postgres: an environment variable holding the password")
    db: int = _setting(0, "redis: the database to SELECT on each new connection")
    resp: int = _setting(2, "redis: the protocol its connections speak, 2 or 3 (HELLO 3 in the handshake)")
    database: str = _setting("", "postgres: the database to connect to (default: the user's name)")
    client_name: str = _setting("", "redis: the CLIENT SETNAME of each connection; postgres: its application_name")
    pool_mode: str = _setting("session", 'postgres: "session" (reset on every return) or "transaction"')
    on_connect: tuple[Step, ...] = _file_setting((), "steps run once on each new connection (AUTH, SELECT...)")
    reset: tuple[Step, ...] | str = _file_setting(
        RESET_AUTO, 'on return: "auto" (the protocol\'s, when needed), "off", "discard", or steps'
    )
    cluster_max_size: int = _setting(0, "with [cluster]: connections all brokers open in all, at most (0: not shared)")
    reserved: int = _setting(0, "with [cluster]: this broker's share that needs no permit (with or without etcd)")

    @property
    def lends(self) -> bool:
        """Its sockets may be lent: a TLS pool's can't be (the TLS state lives in the broker)."""
        return self.lend_sockets and not self.tls

    def __post_init__(self) -> None:
        where = f"pool {self.name!r}"
        if not self.name or len(self.name) > 128:
            raise ConfigError("a pool name must be 1 to 128 characters")
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}: port {self.port} is out of range")
        if self.max_size < 1:
            raise ConfigError(f"{where}: max_size must be at least 1")
        if not 0 <= self.min_idle <= self.max_size:
            raise ConfigError(f"{where}: min_idle must be between 0 and max_size ({self.max_size})")
        if self.max_waiting < 0:
            raise ConfigError(f"{where}: max_waiting must not be negative")
        if self.max_leases_per_client < 0:
            raise ConfigError(f"{where}: max_leases_per_client must not be negative")
        positive = ("acquire_timeout", "connect_timeout", "connect_backoff", "connect_backoff_max")
        for name in (*positive, "io_timeout", "probe_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}: {name} must be positive")
        for name in (
            "idle_timeout",
            "max_lifetime",
            "check_idle_after",
            "check_interval",
            "leak_warning_after",
            "lease_idle_timeout",
            "max_lease_time",
        ):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{where}: {name} must not be negative")
        if self.connect_backoff > self.connect_backoff_max:
            raise ConfigError(f"{where}: connect_backoff must not exceed connect_backoff_max")
        if not self.tls and (self.tls_ca_file or self.tls_server_name or self.tls_cert_file or self.tls_key_file):
            raise ConfigError(f"{where}: tls_* settings need tls = true")
        if self.tls_key_file and not self.tls_cert_file:
            raise ConfigError(f"{where}: tls_key_file needs tls_cert_file")
        if isinstance(self.reset, str) and self.reset not in RESET_MODES:
            raise ConfigError(f'{where}: reset is a list of steps, "auto", "off" or "discard", not {self.reset!r}')
        if self.pool_mode not in POOL_MODES:
            raise ConfigError(f'{where}: pool_mode is "session" or "transaction", not {self.pool_mode!r}')
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"{where}: protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        self._check_cluster_settings(where)
        self._check_session_settings(where)
        if not self.probe:  # the protocol's own
            object.__setattr__(self, "probe", PROTOCOL_PROBES[self.protocol])
        self._check_probe(where)

    def _check_cluster_settings(self, where: str) -> None:
        if self.cluster_max_size < 0 or self.reserved < 0:
            raise ConfigError(f"{where}: cluster_max_size and reserved must not be negative")
        if not self.cluster_max_size:
            if self.reserved:
                raise ConfigError(f"{where}: reserved needs cluster_max_size (the budget it is a share of)")
            return
        if self.reserved > min(self.max_size, self.cluster_max_size):
            raise ConfigError(f"{where}: reserved must not exceed max_size or cluster_max_size")
        if self.min_idle > self.reserved:
            raise ConfigError(f"{where}: min_idle must not exceed reserved (connections kept ready need no permit)")

    @property
    def shared(self) -> bool:
        """Its connections count against a budget that brokers on many hosts share ([cluster])."""
        return self.cluster_max_size > 0

    def _check_session_settings(self, where: str) -> None:
        every = {key for keys in SESSION_KEYS.values() for key in keys}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        given = [key for key in sorted(every) if getattr(self, key) != defaults[key]]
        allowed = SESSION_KEYS.get(self.protocol, ())
        if wrong := [key for key in given if key not in allowed]:
            which = " or ".join(f'"{name}"' for name, keys in SESSION_KEYS.items() if set(wrong) <= set(keys))
            raise ConfigError(f"{where}: {', '.join(wrong)} need protocol = {which or 'redis or postgres'}")
        if given and self.on_connect:
            raise ConfigError(f"{where}: give on_connect steps or {', '.join(given)}, not both")
        if self.protocol == "postgres" and not self.username:
            raise ConfigError(f'{where}: protocol = "postgres" needs a username to log in as')
        if self.protocol == "redis" and self.username and not self.password:
            raise ConfigError(f"{where}: username needs a password (password, password_file or password_env)")
        if self.resp not in (2, 3):
            raise ConfigError(f"{where}: resp must be 2 or 3")
        if not 0 <= self.db <= 1_000_000:
            raise ConfigError(f"{where}: db must be a database number (0 or more)")
        if self.protocol == "redis" and any(c.isspace() for c in self.client_name):
            raise ConfigError(f"{where}: client_name must not contain spaces (Redis refuses them)")

    def _check_probe(self, where: str) -> None:
        if self.probe not in PROBES:
            raise ConfigError(f"{where}: probe {self.probe!r} is not one of {', '.join(PROBES)}")
        if self.probe == "send" and not (self.probe_send and self.probe_expect):
            raise ConfigError(f'{where}: probe = "send" needs probe_send and probe_expect')
        if self.probe in ("tcp", "redis", "memcached", "postgres") and (self.probe_send or self.probe_expect):
            raise ConfigError(f'{where}: probe_send and probe_expect are for probe = "send" or "http"')
        if self.probe == "http":
            parts = self.probe_send.split()
            if self.probe_send and not (2 <= len(parts) <= 3 and parts[1].startswith("/")):
                raise ConfigError(f"{where}: probe_send {self.probe_send!r} is not an HTTP request line (HEAD /path)")
            if not self.probe_expect.isdigit() and self.probe_expect:
                raise ConfigError(f'{where}: probe_expect for http is a status prefix, such as "2" or "204"')

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
DEFAULT_MAX_WAITING_PAYLOAD = 64 * 1024 * 1024
REPLY_OVERHEAD = 1024  # room for a reply's fields around its data
DEFAULT_LOG_LEVEL = "info"
DEFAULT_SHUTDOWN_GRACE = 10.0


NAME_MARK = "poolbroker."  # a shared pool's connections are named for their broker (decide/fence.py)


def connection_name(client_name: str, broker: str) -> str:
    """What a shared pool's connections are named (Redis's CLIENT SETNAME, PostgreSQL's
    application_name): `broker` is fenced by it, if it is lost."""
    return f"{client_name}.{NAME_MARK}{broker}" if client_name else f"{NAME_MARK}{broker}"


CLUSTER_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_CLUSTER_NAME = 40  # (it names connections: PostgreSQL's application_name holds 63 bytes)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """[cluster]: brokers on many hosts share their pools' budgets through etcd."""

    etcd: tuple[str, ...] = field(metadata={"help": 'the etcd cluster\'s client URLs: ["http://HOST:PORT", ...]'})
    name: str = field(metadata={"help": "this broker's name in the cluster: unique, and the same across its restarts"})
    ttl: int = _setting(10, "seconds its etcd lease lives unrefreshed: how long a lost broker's permits stay away")

    def __post_init__(self) -> None:
        if not self.etcd:
            raise ConfigError("[cluster] etcd lists no endpoints")
        for url in self.etcd:
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in ("http", "https") or not rest:
                raise ConfigError(f"[cluster] etcd endpoint {url!r} is not http://HOST:PORT or https://HOST:PORT")
            parse_address(rest.rstrip("/"))
        if not 0 < len(self.name) <= MAX_CLUSTER_NAME or not set(self.name) <= CLUSTER_NAME_CHARACTERS:
            raise ConfigError(
                f"[cluster] name {self.name!r} must be 1 to {MAX_CLUSTER_NAME} letters, digits, '.', '_' or '-'"
            )
        if not 1 <= self.ttl <= 3600:
            raise ConfigError("[cluster] ttl must be between 1 and 3600 seconds")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The whole broker: where it listens and its pools."""

    bind: str | None = _setting(
        None, "ipc://PATH or tcp://HOST:PORT (default: ipc:// in the private runtime directory)"
    )
    pools: tuple[PoolConfig, ...] = ()
    max_message_size: int = _setting(
        DEFAULT_MAX_MESSAGE_SIZE, "bytes; a client that sends a larger request is disconnected"
    )
    max_payload: int = _setting(DEFAULT_MAX_PAYLOAD, "bytes one I/O operation sends, and reads, at most")
    max_waiting_payload: int = _setting(DEFAULT_MAX_WAITING_PAYLOAD, "bytes the lease requests in line carry, in all")
    log_level: str = _setting(DEFAULT_LOG_LEVEL, "debug, info, warning or error")
    log_format: str = _setting("text", "text, or json: one object per line, for log shippers")
    metrics_bind: str | None = _setting(None, "HOST:PORT to serve Prometheus /metrics on (default: none)")
    shutdown_grace: float = _setting(DEFAULT_SHUTDOWN_GRACE, "seconds active leases may finish after SIGTERM")
    curve_secret_key: str | None = _setting(
        None, "the broker's CURVE key pair (a `poolbroker keygen` .key_secret file)"
    )
    curve_clients: str | None = _setting(None, "a directory of the public keys of the clients to let in")
    admin_keys: str | None = _setting(None, "a directory of the public keys that may also administer")
    cluster: ClusterConfig | None = None  # [cluster]: a budget shared with brokers on other hosts
    # What loading found: a line per file setting a flag overrides (the flag wins, at every reload).
    overridden: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [pool.name for pool in self.pools]
        if len(set(names)) != len(names):
            raise ConfigError("pool names must be unique")
        if self.cluster is None and (shared := [pool.name for pool in self.pools if pool.shared]):
            raise ConfigError(f"pool(s) {', '.join(shared)}: cluster_max_size needs a [cluster] table")
        if self.max_message_size < 4096:
            raise ConfigError("max_message_size must be at least 4096 bytes")
        if not 1 <= self.max_payload <= self.max_message_size - REPLY_OVERHEAD:
            limit = self.max_message_size - REPLY_OVERHEAD
            raise ConfigError(f"max_payload must be between 1 and max_message_size - {REPLY_OVERHEAD} ({limit})")
        if self.max_waiting_payload < self.max_payload:
            raise ConfigError(f"max_waiting_payload must be at least max_payload ({self.max_payload})")
        if not self.shutdown_grace >= 0:
            raise ConfigError("shutdown_grace must not be negative")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level must be debug, info, warning or error, not {self.log_level!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, not {self.log_format!r}")
        if self.metrics_bind is not None:
            try:
                parse_address(self.metrics_bind)
            except ConfigError:
                raise ConfigError(f"metrics_bind {self.metrics_bind!r} is not HOST:PORT") from None


POOL_SETTINGS = {f.name: f for f in dataclasses.fields(PoolConfig) if "help" in f.metadata}
POOL_KEYS = frozenset(POOL_SETTINGS)
# [broker] keys whose values are strings, taken as given (key files are read at start).
BROKER_STRINGS = ("curve_secret_key", "curve_clients", "admin_keys", "metrics_bind", "log_format")
BROKER_KEYS = frozenset(
    {"bind", "max_message_size", "max_payload", "max_waiting_payload", "log_level", "shutdown_grace", *BROKER_STRINGS}
)


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
