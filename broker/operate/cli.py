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
from poolbroker.broker.drive import security
from poolbroker.broker.drive.server import Server
from poolbroker.broker.operate import commands as operator_commands
from poolbroker.broker.operate import logs
from poolbroker.broker.operate.metrics import MetricsServer
from poolbroker.broker.operate.operations import Operations
from poolbroker.broker.operate.runtime import prepare_ipc
from poolbroker.broker.settings import POOL_SETTINGS, PROBES, PROTOCOLS, BrokerConfig, ConfigError, parse_address
from poolbroker.wire.endpoint import default_endpoint

log = logging.getLogger("broker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolbroker", description="A connection pool shared by processes.")
    parser.add_argument("--version", action="version", version=f"poolbroker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--config", metavar="FILE.toml", help="a [broker] table and one [pools.NAME] table per pool")
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
        help_text = f"{setting.metadata['help']} (default {default})".replace("%", "%%")
        flag = f"--{name.replace('_', '-')}"
        if str(setting.type) == "bool":
            pools.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(setting.type), str)
        choices = {"probe": PROBES, "protocol": PROTOCOLS}.get(name)
        pools.add_argument(flag, type=kind, choices=choices, help=help_text)
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
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
    keygen.add_argument("directory")
    keygen.add_argument("--name", default="poolbroker", help="file name stem (default poolbroker)")
    operator_commands.add_parsers(commands)
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

    try:
        config = read_config()
        endpoint = config.bind or default_endpoint()
        curve = security.load_curve(config)
        security.check_bind(endpoint, curve)
        if endpoint.startswith("ipc://"):
            prepare_ipc(endpoint)
    except ConfigError as exc:
        print(f"poolbroker: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level, config.log_format)
    raise_fd_limit()
    try:
        server = Server(config, curve=curve, reload_config=read_config if args.config else None)
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
        print(f"poolbroker: can't bind {endpoint} or {config.metrics_bind}: {exc}", file=sys.stderr)
        server.close()
        return 1
    log.info("poolbroker %s listening on %s", __version__, endpoint)
    if metrics is not None:
        log.info("metrics on http://%s/metrics", config.metrics_bind)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` prints where it is
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    signal.signal(signal.SIGHUP, lambda *_: server.request_reload())
    # libzmq's I/O threads may take the signal, leaving the loop's poll() uninterrupted: the C-level
    # handler writes to this fd from whatever thread, which wakes the poll so the handler can run.
    signal.set_wakeup_fd(server.wakeup_fd)
    try:
        server.serve()
    finally:
        signal.set_wakeup_fd(-1)
        if metrics is not None:
            metrics.close()
        server.close()
    log.info("stopped")
    return 0


def keygen(args: argparse.Namespace) -> int:
    public, secret = security.keygen(args.directory, args.name)
    print(f"public key (give it out): {public}\nkey pair (keep it, mode 0600): {secret}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "keygen":
        return keygen(args)
    return operator_commands.run(args)
