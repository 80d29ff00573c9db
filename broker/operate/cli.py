"""The `poolbroker` command (also `python -m poolbroker`)."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import resource
import signal
import sys

import zmq

from poolbroker.broker import __version__
from poolbroker.broker.config import load
from poolbroker.broker.drive import security, tls
from poolbroker.broker.drive.server import Server
from poolbroker.broker.operate import cluster_command, logs
from poolbroker.broker.operate import commands as operator_commands
from poolbroker.broker.operate.metrics import MetricsServer
from poolbroker.broker.operate.operations import Operations
from poolbroker.broker.operate.runtime import check_ipc, prepare_ipc
from poolbroker.broker.operate.startup import describe, notify_systemd, unguarded_pools
from poolbroker.broker.settings import (
    POOL_MODES,
    POOL_SETTINGS,
    PROBES,
    PROTOCOLS,
    BrokerConfig,
    ConfigError,
    parse_address,
)
from poolbroker.wire.endpoint import default_endpoint

log = logging.getLogger("broker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolbroker", description="A connection pool shared by processes.")
    parser.add_argument("--version", action="version", version=f"poolbroker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--config", metavar="FILE.toml", help="a [broker] table and one [pools.NAME] table per pool")
    serve.add_argument(
        "--check",
        action="store_true",
        help="check the config and the key, TLS and password files it names, say what would be served, and exit"
        " (0: good; 2: the problem, named); nothing is started or bound",
    )
    serve.add_argument("--bind", metavar="ENDPOINT", help="ipc://PATH or tcp://HOST:PORT (default: private ipc)")
    serve.add_argument(
        "--upstream",
        action="append",
        metavar="NAME=HOST:PORT",
        help="a pool in front of an upstream; repeat for more pools",
    )
    pools = serve.add_argument_group("pool settings (apply to every pool; override the file)")
    for name, setting in POOL_SETTINGS.items():
        if setting.metadata.get("file_only"):
            continue
        default = setting.default if setting.default != "" else "none"
        if name == "probe":
            default = "the protocol's own"
        help_text = f"{setting.metadata['help']} (default {default})".replace("%", "%%")
        flag = f"--{name.replace('_', '-')}"
        if str(setting.type) == "bool":
            pools.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(setting.type), str)
        choices = {"probe": PROBES, "protocol": PROTOCOLS, "pool_mode": POOL_MODES}.get(name)
        pools.add_argument(flag, type=kind, choices=choices, help=help_text)
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="what the log shows (default info)"
    )
    serve.add_argument(
        "--shutdown-grace", type=float, metavar="S", help="seconds active leases may finish after SIGTERM (default 10)"
    )
    limits = serve.add_argument_group("limits and security (override the file's [broker] table)")
    limits.add_argument("--max-message-size", type=int, metavar="BYTES", help="largest request (default 16 MiB)")
    limits.add_argument("--max-payload", type=int, metavar="BYTES", help="most bytes one I/O sends or reads (8 MiB)")
    limits.add_argument(
        "--max-waiting-payload", type=int, metavar="BYTES", help="most bytes lease requests in line carry (64 MiB)"
    )
    limits.add_argument("--curve-secret-key", metavar="FILE", help="the broker's CURVE key pair (.key_secret)")
    limits.add_argument("--curve-clients", metavar="DIR", help="public keys of the clients to let in")
    limits.add_argument("--admin-keys", metavar="DIR", help="public keys that may also administer")
    serve.add_argument("--metrics-bind", metavar="HOST:PORT", help="serve Prometheus /metrics there")
    serve.add_argument("--log-format", choices=["text", "json"], help="json: one object per line (default text)")

    keygen = commands.add_parser("keygen", help="write a CURVE key pair: NAME.key (public), NAME.key_secret (0600)")
    keygen.add_argument("directory", help="where to write the two files (made if missing)")
    keygen.add_argument("--name", default="poolbroker", help="file name stem (default poolbroker)")
    keygen.add_argument(
        "--force", action="store_true", help="replace an existing pair (every client holding the old key is locked out)"
    )
    operator_commands.add_parsers(commands)
    cluster_command.add_parser(commands)
    return parser


def raise_fd_limit() -> None:
    """Every client connection is a file descriptor, and libzmq's ipc listener aborts the process
    when it can't accept one (EMFILE): so take all the descriptors the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("can't raise the open files limit from %d to %d: %s", soft, hard, exc)
            return
    log.debug("open files limit: %d", hard)


def serve(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in POOL_SETTINGS}

    def read_config() -> BrokerConfig:
        return load(
            args.config,
            bind=args.bind,
            upstreams=args.upstream,
            overrides=overrides,
            log_level=args.log_level,
            shutdown_grace=args.shutdown_grace,
            broker_overrides={
                "max_message_size": args.max_message_size,
                "max_payload": args.max_payload,
                "max_waiting_payload": args.max_waiting_payload,
                "curve_secret_key": args.curve_secret_key,
                "curve_clients": args.curve_clients,
                "admin_keys": args.admin_keys,
                "metrics_bind": args.metrics_bind,
                "log_format": args.log_format,
            },
        )

    def reread() -> BrokerConfig:  # (a reload: the flags still win over the file, and it says so)
        config = read_config()
        for line in config.overridden:
            log.warning("%s", line)
        return config

    endpoint = ""
    try:
        config = read_config()
        endpoint = config.bind or default_endpoint()
        curve = security.load_curve(config)
        security.check_bind(endpoint, curve)
        if args.check:  # (a start finds these making the server and binding)
            for pool in config.pools:
                tls.client_context(pool)  # (a TLS file that does not load)
            if endpoint.startswith("ipc://"):
                check_ipc(endpoint)
            print("\n".join([describe(config, endpoint, args.config), *config.overridden]))
            return 0
        if endpoint.startswith("ipc://"):
            prepare_ipc(endpoint)
    except ConfigError as exc:
        print(f"poolbroker: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # (the socket's directory can't be made: permissions)
        print(f"poolbroker: can't prepare {exc.filename or endpoint}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    raise_fd_limit()
    for warning in (*config.overridden, *unguarded_pools(config)):
        log.warning("%s", warning)
    try:
        server = Server(config, curve=curve, reload_config=reread if args.config else None)
        Operations(server).install()
    except ConfigError as exc:  # (a TLS file that does not load)
        print(f"poolbroker: {exc}", file=sys.stderr)
        return 2
    metrics = None
    try:
        endpoint = server.bind(endpoint)
        if config.metrics_bind:
            metrics = MetricsServer(server, parse_address(config.metrics_bind))
    except (zmq.ZMQError, OSError) as exc:
        where = config.metrics_bind if server.endpoint else endpoint
        print(f"poolbroker: can't bind {where}: {exc}", file=sys.stderr)
        server.close()
        return 2
    log.info("poolbroker %s listening on %s", __version__, endpoint)
    if metrics is not None:
        log.info("metrics on http://%s/metrics", config.metrics_bind)
    cluster = None
    if config.cluster is not None and any(pool.shared for pool in config.pools):
        try:
            from poolbroker.broker.drive.cluster import ClusterAgent  # (etcd3gw: the cluster extra)
        except ImportError as exc:
            print(f"poolbroker: [cluster] needs {exc.name}: pip install 'poolbroker[cluster]'", file=sys.stderr)
            server.close()
            return 2
        cluster = ClusterAgent(server, config.cluster)
        try:
            cluster.join()
        except ConfigError as exc:
            print(f"poolbroker: {exc}", file=sys.stderr)
            cluster.close()  # (its etcd lease revoked: no member left behind)
            if metrics is not None:
                metrics.close()
            server.close()
            return 2
        cluster.start()
    elif config.cluster is not None:
        log.warning("[cluster] is given, but no pool has cluster_max_size: no budget is shared")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` prints where it is
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    signal.signal(signal.SIGHUP, lambda *_: server.request_reload())
    # libzmq's I/O threads may take the signal, leaving the loop's poll() uninterrupted: the C-level
    # handler writes to this fd from whatever thread, which wakes the poll so the handler can run.
    signal.set_wakeup_fd(server.wakeup_fd)
    notify_systemd("READY=1")  # (Type=notify: ready once bound)
    try:
        server.serve()
    finally:
        signal.set_wakeup_fd(-1)
        if cluster is not None:
            cluster.close()
        if metrics is not None:
            metrics.close()
        server.close()
    log.info("stopped")
    return 0


def keygen(args: argparse.Namespace) -> int:
    existing = [p for p in security.key_files(args.directory, args.name) if p.exists()]
    if existing and not args.force:
        names = " and ".join(str(p) for p in existing)
        print(
            f"poolbroker: {names} exist: replacing them locks out every client that has the old key;"
            " give --force to replace them",
            file=sys.stderr,
        )
        return 2
    public, secret = security.keygen(args.directory, args.name)
    print(f"public key (give it out): {public}\nkey pair (keep it, mode 0600): {secret}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "keygen":
        return keygen(args)
    if args.command == "cluster":
        return cluster_command.run(args)
    return operator_commands.run(args)
