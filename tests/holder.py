"""A worker process that holds or cycles leases, for the tests and benchmarks that kill it.

Usage: python holder.py ENDPOINT hold [TAG] lease (tagged TAG, else hold-PID), say "held", then
                                            sleep on the lease until killed
       python holder.py ENDPOINT loop STATE INDEX
                                            lease, INCR, release, forever; byte INDEX of the file
                                            STATE says where it is: 0 nothing held or asked,
                                            1 holding (granted, no release sent), 2 in between
"""

from __future__ import annotations

import mmap
import os
import sys
import time

from poolbroker import Client

NOTHING, HOLDING, IN_BETWEEN = 0, 1, 2


def hold(client: Client, tag: str) -> None:
    lease = client.lease("redis", tag=tag)
    lease.request(b"PING\r\n", until=b"\r\n")
    print("held", flush=True)
    time.sleep(120)


def loop(client: Client, state_path: str, index: int) -> None:
    with open(state_path, "r+b") as f:
        state = mmap.mmap(f.fileno(), 0)
    key = f"kill:{os.getpid()}".encode()
    while True:
        state[index] = IN_BETWEEN  # asking
        lease = client.lease("redis")
        state[index] = HOLDING
        lease.request(b"INCR " + key + b"\r\n", until=b"\r\n")
        state[index] = IN_BETWEEN  # releasing: sent, but has the broker seen it?
        lease.release()
        client.ping()  # the release went out before this round trip came back
        state[index] = NOTHING


def main() -> None:
    client = Client(sys.argv[1], timeout=60.0)
    if sys.argv[2] == "hold":
        hold(client, sys.argv[3] if len(sys.argv) > 3 else f"hold-{os.getpid()}")
    else:
        loop(client, sys.argv[3], int(sys.argv[4]))


if __name__ == "__main__":
    main()
