"""Where the broker's time goes under load: CPU per lease cycle of each broker thread and of the
clients, and optionally a py-spy profile of the broker's loop.

    .venv/bin/python scripts/bench_profile.py [--processes 100] [--seconds 4] [--py-spy OUT.txt]

N client processes run one-shot PING cycles (`c.request`) against a broker with a pool of 10 in
front of a private Redis. With --py-spy (`pip install py-spy` into .venv first), the broker is
sampled for the run and the functions with the most samples are printed, by their own time and
with what they call; the raw stacks are written to OUT.txt.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import CLOCK_TICKS, PING, POOL, ROOT, start_broker, worker  # (it puts the root on sys.path)

from tests.support import RedisServer, wait_for


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by thread name (libzmq names its threads ZMQbg/IO/0, ZMQbg/Reaper)."""
    cpu: dict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        cpu[name] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return cpu


def summarize(raw: Path, top: int = 20) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        print("py-spy took no samples")
        return
    print(f"py-spy: {total} samples of the broker's loop thread")
    print("  own time:")
    for name, samples in own.most_common(top):
        print(f"    {samples / total:6.1%}  {name}")
    print("  with what it calls:")
    for name, samples in inclusive.most_common(top + 6)[6:]:  # the first few are the loop's callers
        print(f"    {samples / total:6.1%}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--py-spy", type=Path, help="sample the broker with py-spy; raw stacks to this file")
    args = parser.parse_args()
    spy_exe = shutil.which("py-spy", path=f"{ROOT / '.venv' / 'bin'}:{Path(sys.executable).parent}")
    if args.py_spy and spy_exe is None:
        parser.error("py-spy is not installed (.tools/uv-*/bin/uv pip install --python .venv py-spy)")
    redis = RedisServer().start()
    broker = start_broker(redis, "--acquire-timeout", "60")
    try:
        mp = multiprocessing.get_context("fork")
        ready, start, end, results = mp.Value("q", 0), mp.Event(), mp.Value("d", 0.0), mp.Queue()
        procs = [
            mp.Process(target=worker, args=("pool", broker.endpoint, ready, start, end, results))
            for _ in range(args.processes)
        ]
        for proc in procs:
            proc.start()
        # The clock starts once every process is connected, warm and waiting (a barrier, not a guess).
        wait_for(lambda: ready.value == args.processes, timeout=120, what="the client processes to be ready")
        before = thread_cpu(broker.pid)
        end.value = time.monotonic() + args.seconds
        start.set()
        spy = None
        if args.py_spy:
            argv = [spy_exe, "record", "-p", str(broker.pid), "-d", str(max(1, int(args.seconds) - 1))]
            argv += ["-f", "raw", "-o", str(args.py_spy), "-r", "500", "--nonblocking"]
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reports = [results.get(timeout=args.seconds + 60) for _ in procs]
        after = thread_cpu(broker.pid)
        for proc in procs:
            proc.join(60)
        if spy is not None:
            spy.wait(60)
    finally:
        broker.stop()
        redis.stop()
    cycles = sum(count for count, _ in reports)
    print(f"{args.processes} processes, pool of {POOL}, one-shot {PING!r} cycles: {cycles / args.seconds:,.0f}/s")
    print(f"  clients (all their threads): {sum(cpu for _, cpu in reports) / cycles * 1e6:6.1f} us CPU per cycle")
    for name, seconds in sorted(after.items()):
        print(f"  broker thread {name:14s} {(seconds - before.get(name, 0.0)) / cycles * 1e6:6.1f} us CPU per cycle")
    if args.py_spy:
        summarize(args.py_spy)


if __name__ == "__main__":
    main()
