"""The `poolbroker` command (also `python -m broker`)."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys

import zmq

from broker import __version__, logs
from broker.config import POOL_SETTINGS, PROBES, ConfigError, load
from broker.runtime import prepare_ipc
from broker.server import Server
from client.endpoint import default_endpoint

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
        kind = {"int": int, "float": float}.get(str(setting.type), str)
        choices = PROBES if name == "probe" else None
        help_text = f"{setting.metadata['help']} (default {setting.default})".replace("%", "%%")
        pools.add_argument(f"--{name.replace('_', '-')}", type=kind, choices=choices, help=help_text)
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--shutdown-grace", type=float, metavar="S", help="seconds active leases may finish after SIGTERM (default 10)"
    )
    return parser


def serve(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in POOL_SETTINGS}
    try:
        config = load(
            args.config,
            bind=args.bind,
            upstreams=args.upstream,
            overrides=overrides,
            log_level=args.log_level,
            shutdown_grace=args.shutdown_grace,
        )
        endpoint = config.bind or default_endpoint()
        if endpoint.startswith("ipc://"):
            prepare_ipc(endpoint)
    except ConfigError as exc:
        print(f"poolbroker: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)
    server = Server(config)
    try:
        endpoint = server.bind(endpoint)
    except zmq.ZMQError as exc:
        print(f"poolbroker: can't bind {endpoint}: {exc}", file=sys.stderr)
        server.close()
        return 1
    pools = ", ".join(f"{p.name}={p.address} (max_size {p.max_size})" for p in config.pools)
    log.info("poolbroker %s listening on %s; pools: %s", __version__, endpoint, pools)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` prints where it is
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    # libzmq's I/O threads may take the signal, leaving the loop's poll() uninterrupted: the C-level
    # handler writes to this fd from whatever thread, which wakes the poll so the handler can run.
    signal.set_wakeup_fd(server.wakeup_fd)
    try:
        server.serve()
    finally:
        signal.set_wakeup_fd(-1)
        server.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2
