"""A worker process for the stress tests: THREADS tasks, each LEASES leases doing INCR on its own key.

Usage: python worker.py ENDPOINT WORKER_ID THREADS LEASES; prints a JSON summary on stdout.
"""

from __future__ import annotations

import json
import sys
import threading

from poolbroker import Client


def main() -> None:
    endpoint, worker, threads, leases = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    client = Client(endpoint, timeout=30.0)  # one Client, shared by every task thread
    errors: list[str] = []
    start = threading.Barrier(threads)

    def task(n: int) -> None:
        key = f"seed:{worker}:{n}".encode()
        start.wait()
        try:
            for i in range(1, leases + 1):
                with client.lease("redis") as conn:
                    reply = conn.request(b"INCR " + key + b"\r\n", until=b"\r\n")
                if reply != b":%d\r\n" % i:  # a reply meant for another lease would show here
                    errors.append(f"{key!r} lease {i}: got {reply!r}")
                    return
        except Exception as exc:
            errors.append(f"{key!r}: {exc!r}")

    workers = [threading.Thread(target=task, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    client.close()
    print(json.dumps({"errors": errors}))


if __name__ == "__main__":
    main()
