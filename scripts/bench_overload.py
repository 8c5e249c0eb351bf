#!/usr/bin/env python3
"""Goodput under overload: requests offered at a multiple of what the workers can serve.

    .venv/bin/python scripts/bench_overload.py --tree DIR [--tree DIR ...] [--load 2]
        [--duration 20] [--rounds 2]

For each checkout given (PYTHONPATH set to it; the current one if none), it starts a
`zroute broker` and one `zroute worker` (--capacity C, the greeting with one word of
--word-time seconds, so the worker serves C / word-time requests a second) on free
loopback ports, and sends requests open loop at --load times that rate for --duration
seconds from one asyncio client. It prints goodput (requests that succeeded within those
--duration seconds, a second), the latency of all successes, and how long a request that
failed took to fail (503 `queue_full`). The
checkouts take turns, --rounds times, so that the machine's noise falls on all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

from children import free_port, start_group, stop_all

ZROUTE = str(Path(sys.executable).with_name("zroute"))


def percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def start(tree: Path | None, capacity: int, word_time: float) -> tuple[str, list[subprocess.Popen]]:
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree)
    procs = [start_group([ZROUTE, "broker", "--frontend", front, "--backend", back,
                          "--log-level", "error"], **quiet),
             start_group([ZROUTE, "worker", "--broker", back, "--id", "w1", "--capacity",
                          str(capacity), f"--Backend.sleep_time={word_time}",
                          "--log-level", "error"], **quiet)]
    return front, procs


async def offer(frontend: str, rate: float, duration: float) -> tuple[dict[str, list[float]], int]:
    """Requests at `rate` a second for `duration` s: seconds each took, by outcome, and how
    many succeeded within the `duration` s (the goodput's; the queue drains after it)."""
    from zroute.client import BrokerError, Client
    outcomes: dict[str, list[float]] = collections.defaultdict(list)
    async with Client(frontend, timeout=30) as client:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the worker has registered
            if any(w["state"] == "ready" for w in (await client.stats())["workers"]):
                break
            await asyncio.sleep(0.1)

        in_window = 0

        async def one() -> None:
            nonlocal in_window
            started = time.monotonic()
            try:
                await client.round_robin("generate", {"text": "x"}).read()
                outcomes["ok"].append(time.monotonic() - started)
                in_window += time.monotonic() < begin + duration
            except BrokerError as e:
                outcomes[e.code].append(time.monotonic() - started)

        tasks = []
        begin = time.monotonic()
        for n in range(int(rate * duration)):
            await asyncio.sleep(max(0.0, begin + n / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return outcomes, in_window


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="a checkout to measure (repeatable); default: this one")
    parser.add_argument("--load", type=float, default=2.0, help="times capacity (default 2)")
    parser.add_argument("--capacity", type=int, default=4, help="the worker's capacity (default 4)")
    parser.add_argument("--word-time", type=float, default=0.05,
                        help="seconds per request on the worker (default 0.05)")
    parser.add_argument("--duration", type=float, default=20, help="seconds of load (default 20)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trees = [t.resolve() for t in args.tree] or [None]
    capacity_rate = args.capacity / args.word_time
    rate = args.load * capacity_rate
    print(f"{os.cpu_count()} CPUs; capacity {capacity_rate:g} req/s, offered {rate:g} req/s "
          f"for {args.duration:g} s, {args.rounds} rounds")
    print("| code | round | offered | goodput req/s | success p50 / p99 ms "
          "| failed | time to fail p50 / p99 ms | failures by code |")
    print("|---|---:|---:|---:|---|---:|---|---|")
    for round_no in range(1, args.rounds + 1):
        for tree in trees:
            frontend, procs = start(tree, args.capacity, args.word_time)
            try:
                outcomes, in_window = asyncio.run(offer(frontend, rate, args.duration))
            finally:
                stop_all(procs)
            ok = outcomes.pop("ok", [])
            failed = [t for times in outcomes.values() for t in times]
            codes = ", ".join(f"{code} {len(times)}" for code, times in sorted(outcomes.items()))
            print(f"| {tree.name if tree else 'this tree'} | {round_no} | {int(rate * args.duration)} "
                  f"| {in_window / args.duration:.1f} "
                  f"| {percentile(ok, 0.5) * 1000:.0f} / {percentile(ok, 0.99) * 1000:.0f} "
                  f"| {len(failed)} | {percentile(failed, 0.5) * 1000:.0f} / "
                  f"{percentile(failed, 0.99) * 1000:.0f} | {codes} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
