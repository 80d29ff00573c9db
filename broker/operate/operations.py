"""Requests that look at or change the broker rather than lease from it: ping, stats, leases,
and the administrators' pause, resume, resize, drain, reload and shutdown (admin only; the driver
checks who may before any of these runs)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from poolbroker.broker import __version__
from poolbroker.broker.drive import tls
from poolbroker.broker.drive.pools import PoolState, unknown_pool
from poolbroker.broker.operate import logs
from poolbroker.broker.settings import ConfigError
from poolbroker.wire.protocol import (
    ADMIN_DRAIN,
    ADMIN_PAUSE,
    ADMIN_RELOAD,
    ADMIN_RESIZE,
    ADMIN_RESUME,
    ADMIN_SHUTDOWN,
    OP_ADMIN,
    OP_LEASES,
    OP_PING,
    OP_STATS,
    ErrorCode,
    Request,
    error_reply,
    ok_reply,
)

if TYPE_CHECKING:
    from poolbroker.broker.drive.server import Server

log = logging.getLogger("broker.server")  # (the operator's log lines keep the name they always had)

# Broker settings a reload can't change in a running broker: they are the socket's.
RESTART_KEYS = (
    "bind",
    "max_message_size",
    "curve_secret_key",
    "curve_clients",
    "admin_keys",
    "metrics_bind",
    "log_format",
    "cluster",  # (the etcd session and this broker's name in it)
)

Handler = Callable[[bytes, Request, float], None]


def _differences(old: Any, new: Any, keys: Iterable[str]) -> list[str]:
    return [key for key in keys if getattr(old, key) != getattr(new, key)]


class Operations:
    """The broker's operations requests, answered through the server that owns the sockets."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._admin_actions: dict[str, Handler] = {
            ADMIN_PAUSE: self._pause,
            ADMIN_RESUME: self._resume,
            ADMIN_RESIZE: self._resize,
            ADMIN_DRAIN: self._drain,
            ADMIN_RELOAD: self._reload_for,
            ADMIN_SHUTDOWN: self._shutdown_for,
        }

    def install(self) -> None:
        """Answer the operations requests, and reload on SIGHUP, in the server."""
        self.server.add_operations(self.handlers(), self.reload)

    def handlers(self) -> dict[str, Handler]:
        return {OP_PING: self._on_ping, OP_STATS: self._on_stats, OP_LEASES: self._on_leases, OP_ADMIN: self._on_admin}

    def _on_admin(self, peer: bytes, req: Request, now: float) -> None:
        assert req.action is not None  # parse_request guarantees it
        self._admin_actions[req.action](peer, req, now)

    def _admin_pool(self, peer: bytes, req: Request) -> PoolState | None:
        server = self.server
        pool = server.pools.get(req.pool or "")
        if pool is None:
            server.reply(peer, unknown_pool(server.pools, req))
        return pool

    def _pause(self, peer: bytes, req: Request, now: float) -> None:
        server = self.server
        if pool := self._admin_pool(peer, req):
            pool.core.pause()
            log.info("pool %r: paused by an administrator (%d waiting)", pool.config.name, pool.core.waiting)
            server.reply(peer, ok_reply(req.id))

    def _resume(self, peer: bytes, req: Request, now: float) -> None:
        server = self.server
        if pool := self._admin_pool(peer, req):
            log.info("pool %r: resumed by an administrator (%d waiting)", pool.config.name, pool.core.waiting)
            server.carry_out(pool, pool.core.resume(now), now)
            server.reply(peer, ok_reply(req.id))

    def _resize(self, peer: bytes, req: Request, now: float) -> None:
        server = self.server
        if pool := self._admin_pool(peer, req):
            assert req.max_size is not None
            old = pool.config
            config = dataclasses.replace(old, max_size=req.max_size, min_idle=min(old.min_idle, req.max_size))
            log.info("pool %r: max_size %d -> %d by an administrator", old.name, old.max_size, req.max_size)
            server.carry_out(pool, pool.reconfigure(config, now), now)
            server.reply(peer, ok_reply(req.id))

    def _drain(self, peer: bytes, req: Request, now: float) -> None:
        server = self.server
        if pool := self._admin_pool(peer, req):
            log.info(
                "pool %r: drained by an administrator: %d idle closing now, %d leased closing on return",
                pool.config.name,
                len(pool.core.idle),
                len(pool.core.leased),
            )
            server.carry_out(pool, pool.core.drain(now), now)
            server.reply(peer, ok_reply(req.id))

    def _reload_for(self, peer: bytes, req: Request, now: float) -> None:
        server = self.server
        try:
            changes = self.reload(now)
        except ConfigError as exc:
            log.error("reload failed, nothing changed: %s", exc)
            server.reply(peer, error_reply(req.id, ErrorCode.RELOAD_FAILED, str(exc)))
            return
        server.reply(peer, ok_reply(req.id, **changes))

    def _shutdown_for(self, peer: bytes, req: Request, now: float) -> None:
        server = self.server
        log.info("shutdown asked by an administrator")
        server.reply(peer, ok_reply(req.id))
        server.stop()

    def reload(self, now: float) -> dict[str, list[str]]:
        """Read the config file again and apply it: pools added, removed or changed; active leases
        untouched. Raises ConfigError (and changes nothing) if the file is invalid."""
        server = self.server
        if server.reload_config is None:
            raise ConfigError("this broker was started without a config file: nothing to reload")
        if server.shutting_down:
            raise ConfigError("the broker is shutting down")
        config = server.reload_config()
        for pool_config in config.pools:
            tls.client_context(pool_config)  # a TLS file that does not load fails the reload before any change
        for key in _differences(server.config, config, RESTART_KEYS):
            log.warning("reload: %s changed; it takes effect at the next restart", key)
        old = {pool.name: pool for pool in server.config.pools}
        new = {pool.name: pool for pool in config.pools}
        changes: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
        for name in old.keys() - new.keys():
            pool = server.pools.pop(name)
            log.info("pool %r: removed by a reload; its %d leases finish first", name, len(pool.core.leased))
            server.carry_out(pool, pool.core.shutdown(f"pool {name!r} was removed from the configuration"), now)
            changes["removed"].append(name)
        for name, pool_config in new.items():
            if name not in old:
                pool = server.pools[name] = PoolState(pool_config)
                server.log_opened(pool)
                server.carry_out(pool, pool.core.tick(now), now)  # warm up to min_idle
                changes["added"].append(name)
            elif pool_config != old[name]:
                differ = _differences(old[name], pool_config, [f.name for f in dataclasses.fields(pool_config)])
                log.info("pool %r: changed by a reload: %s", name, ", ".join(differ))
                pool = server.pools[name]
                server.carry_out(pool, pool.reconfigure(pool_config, now), now)
                server.leasing.look_at_leases_later(pool, now)  # (its lease limits may have changed)
                changes["changed"].append(name)
        server.config = dataclasses.replace(config, **{key: getattr(server.config, key) for key in RESTART_KEYS})
        logs.set_level(server.config.log_level)
        log.info(
            "reloaded: %s added, %s removed, %s changed",
            *(", ".join(sorted(names)) or "none" for names in changes.values()),
        )
        return changes

    def _on_leases(self, peer: bytes, req: Request, now: float) -> None:
        server = self.server
        if req.pool is not None and req.pool not in server.pools:
            server.reply(peer, unknown_pool(server.pools, req))
            return
        leases = [lease.info(now) for lease in server.leases.values()]
        if req.pool is not None:
            leases = [info for info in leases if info["pool"] == req.pool]
        server.reply(peer, ok_reply(req.id, leases=leases))

    def _on_ping(self, peer: bytes, req: Request, now: float) -> None:
        server = self.server
        lends = server.lending is not None  # (a lending socket: on ipc, while a pool lent at start)
        protocols = {name: describe_protocol(pool, lends) for name, pool in server.pools.items()}
        server.reply(peer, ok_reply(req.id, version=__version__, pools=sorted(server.pools), protocols=protocols))

    def _on_stats(self, peer: bytes, req: Request, now: float) -> None:
        server = self.server
        if req.pool is not None and req.pool not in server.pools:
            server.reply(peer, unknown_pool(server.pools, req))
            return
        names = [req.pool] if req.pool is not None else list(server.pools)
        pools = {name: {**server.pools[name].core.stats(), **server.pools[name].cluster} for name in names}
        received, bad = request_counts(server)
        broker = {
            "requests_received": received,
            "bad_requests": bad,
            "leases_active": len(server.leases),
        }
        server.reply(peer, ok_reply(req.id, pools=pools, broker=broker))


def request_counts(server: Server) -> tuple[int, int]:
    """Requests received, and how many were malformed: the broker's socket's and the lending socket's."""
    lending = server.lending
    if lending is None:
        return server.requests_received, server.bad_requests
    return server.requests_received + lending.requests_received, server.bad_requests + lending.bad_requests


def describe_protocol(pool: PoolState, server_lends: bool) -> dict[str, Any]:
    """What a pool speaks, for ping: and for a postgres pool what a driver's bridge needs to stand
    in for the server (its user, database, mode, and what the server announced at login)."""
    config = pool.config
    info: dict[str, Any] = {
        "protocol": config.protocol,
        "reset": pool.protocol.reset_mode,
        "protects": pool.protocol.protects,
        "lends": config.lends and server_lends,
    }
    if config.protocol == "redis":
        info["resp"] = config.resp
    if config.protocol == "postgres":
        info["pool_mode"] = config.pool_mode
        info["user"] = config.username
        info["database"] = config.database or config.username
        info["parameters"] = pool.server_parameters  # (empty until a connection has logged in)
    return info
