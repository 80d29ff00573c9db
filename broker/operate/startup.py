"""What the broker says before it serves: the config described (`serve --check`), pools whose
upstream looks like a server their protocol does not guard; and systemd's readiness notice
(Type=notify). (The file's settings that flags override, loading reports: `config.overridden`.)"""

from __future__ import annotations

import os
import socket

from poolbroker.broker.settings import BrokerConfig

# Well-known ports, and the protocol a pool in front of one should speak: with "tcp" the broker
# follows no session, so what one holder leaves (a SELECT, a transaction) reaches the next.
KNOWN_PORTS = {6379: "redis", 5432: "postgres", 11211: "memcached", 80: "http", 8080: "http"}


def describe(config: BrokerConfig, endpoint: str, path: str | None) -> str:
    """`serve --check`'s answer: where the broker would listen, and each pool in a line."""
    source = f"config {path}" if path else "flags"
    lines = [f"{source}: good; the broker would listen on {endpoint}"]
    for pool in config.pools:
        tls = ", tls" if pool.tls else ""
        lines.append(
            f"  pool {pool.name!r}: {pool.address}, protocol {pool.protocol}{tls}, max_size {pool.max_size},"
            f" probe {pool.probe}"
        )
    return "\n".join(lines + unguarded_pools(config))


def unguarded_pools(config: BrokerConfig) -> list[str]:
    """A warning per pool left at protocol "tcp" in front of a port a known server listens on."""
    lines = []
    for pool in config.pools:
        likely = KNOWN_PORTS.get(pool.port)
        if pool.protocol == "tcp" and likely is not None:
            lines.append(
                f'pool {pool.name!r}: port {pool.port} is {likely}\'s, but protocol = "tcp": no session is'
                f" followed or reset, so what one holder leaves reaches the next; set protocol = {likely!r}"
                " (or --protocol) if that is what it is"
            )
    return lines


def notify_systemd(state: str) -> None:
    """sd_notify: tell systemd (Type=notify) `state`, if it started us with a NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # (an abstract socket)
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            pass  # (systemd gone: nothing to tell)
