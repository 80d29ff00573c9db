"""The `poolbroker` command's entry point: the CLI, or, where only the worker side is installed
(`pip install poolbroker`: pyzmq and msgpack), one line saying what the command needs."""

from __future__ import annotations

import sys

BROKER_EXTRA = ("h11", "prometheus_client", "rich", "scramp")  # poolbroker[broker]'s, by import name


def main(argv: list[str] | None = None) -> int:
    try:
        from poolbroker.broker.operate.cli import main as cli
    except ModuleNotFoundError as exc:
        if exc.name not in BROKER_EXTRA:
            raise
        print(
            f"poolbroker: the broker and its commands need {exc.name}, which a worker's install leaves out:"
            ' pip install "poolbroker[broker]"',
            file=sys.stderr,
        )
        return 2
    return cli(argv)
