#!/usr/bin/env python3
"""Compare the routing policies under load: round_robin, random, least_loaded, power_of_two.

What runs (all on this machine, loopback TCP, real processes):

  a `zroute broker` and W `zroute worker` subprocesses (default 4) on free ports, the
  workers serving scripts/bench_handlers.py, and one asyncio zroute.client.Client in this
  process sending the load.

The worker model. The default greeting handler waits with asyncio.sleep, so a worker
serves any number of requests side by side, none slows another, and every policy would
measure the same. bench_handlers.py gives each worker one compute token instead: each
word holds it for --word-time seconds, so a worker does at most 1/word-time words per
second and the requests on it take turns word by word (processor sharing). In-flight
load on a worker now costs latency, which is what a routing policy is meant to avoid.
The token keeps its own clock (a word that waited starts when the previous one ended),
so timer overshoot on a busy host does not quietly raise the load above --load.
Workers run with unlimited capacity by default, so that the broker never queues and the
policy's pick is the only thing that differs between runs; with --capacity 1 every
policy could only pick an idle worker, and they would all become one central queue.

The load. Requests are mostly short (--short-words words) and a few (--long-fraction)
are --long-factor times longer. They arrive open loop, as a Poisson process (seeded),
at --load of the workers' capacity: rate = load * W / (mean words * word time). The
same arrival sequence is played once per policy. It is cut into --rounds slices, and
each slice is played for every policy in turn before the next slice, so that a drift
in the machine's background load is shared by all policies. Latency is from a request's
scheduled arrival to its last chunk, so a late sender counts against the result too.

Examples:
  python scripts/bench_routing.py                     # 30 s of arrivals per policy
  python scripts/bench_routing.py --duration 60 --rounds 6
  python scripts/bench_routing.py --capacity 1        # the central-queue case

Run it with the project's virtualenv python. Every process it starts is stopped at the
end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from children import free_port, start_group, stop_all  # noqa: E402
from zroute.client import BrokerError, Client  # noqa: E402

SERVICE = "generate"
HANDLER = "bench_handlers:make_handler"
POLICIES = ("round_robin", "random", "least_loaded", "power_of_two")
# least_loaded's p99 as a fraction of the others' p99, at most.
TARGETS = {"round_robin": 0.8, "random": 0.6}


# --- the workload -------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds from the start of its slice
    words: int


def mean_words(args: argparse.Namespace) -> float:
    long_words = args.short_words * args.long_factor
    return (1 - args.long_fraction) * args.short_words + args.long_fraction * long_words


def arrival_rate(args: argparse.Namespace) -> float:
    """Requests per second at --load of the workers' capacity."""
    return args.load * args.workers / (mean_words(args) * args.word_time)


def workload(args: argparse.Namespace) -> list[list[Arrival]]:
    """The seeded arrival sequence of --duration seconds, cut into --rounds slices."""
    rng = random.Random(args.seed)
    rate = arrival_rate(args)
    long_words = args.short_words * args.long_factor
    slice_length = args.duration / args.rounds
    slices: list[list[Arrival]] = [[] for _ in range(args.rounds)]
    t = rng.expovariate(rate)
    while t < args.duration:
        words = long_words if rng.random() < args.long_fraction else args.short_words
        index = min(args.rounds - 1, int(t / slice_length))
        slices[index].append(Arrival(t - index * slice_length, words))
        t += rng.expovariate(rate)
    return slices


# --- processes ------------------------------------------------------------------------------


class Cluster:
    """A broker and W workers as `python -m zroute_cli` subprocesses; logs in a temp dir."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        self.log_dir = tempfile.TemporaryDirectory(prefix="bench-routing-")
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ)
        inherited = filter(None, self.env.get("PYTHONPATH", "").split(os.pathsep))
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(SCRIPTS), *inherited])

    def _start(self, name: str, *args: str) -> None:
        log = open(Path(self.log_dir.name) / f"{name}.log", "wb")
        proc = start_group([sys.executable, "-m", "zroute_cli", *args, "--log-level", "warning"],
                           stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        self.procs.append((name, proc))

    def start(self) -> None:
        # A long queue timeout: with --capacity the broker queues, and nothing should 503.
        self._start("broker", "broker", "--frontend", self.frontend, "--backend", self.backend,
                    "--Broker.queue_timeout=120")
        for i in range(1, self.args.workers + 1):
            self._start(f"w{i}", "worker", "--broker", self.backend, "--id", f"w{i}",
                        "--handler", HANDLER, f"--Backend.sleep_time={self.args.word_time}",
                        "--capacity", str(self.args.capacity))

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def log(self, name: str) -> str:
        return (Path(self.log_dir.name) / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        stop_all(proc for _, proc in reversed(self.procs))
        self.log_dir.cleanup()


async def wait_ready(client: Client, cluster: Cluster, workers: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        cluster.check_alive()
        try:
            stats = await client.stats(timeout=1)
            if sum(w["state"] == "ready" for w in stats["workers"]) == workers:
                return
        except BrokerError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the workers did not register within {timeout} s")
        await asyncio.sleep(0.05)


# --- playing the load ---------------------------------------------------------------------


@dataclass
class Result:
    latency: float  # from the scheduled arrival to the last chunk
    words: int
    worker: str | None
    ok: bool
    lag: float  # how late the request was sent


async def play(client: Client, policy: str, arrivals: list[Arrival]) -> list[Result]:
    """Send `arrivals` open loop with `policy`; wait for every reply."""
    loop = asyncio.get_running_loop()

    async def one(scheduled: float, words: int) -> Result:
        lag = loop.time() - scheduled
        stream = client.request(SERVICE, {"text": ",".join(["w"] * words)}, policy=policy)
        chunks = 0
        ok = True
        try:
            async for _ in stream:
                chunks += 1
        except BrokerError:
            ok = False
        return Result(loop.time() - scheduled, words, stream.worker_id, ok and chunks == words, lag)

    start = loop.time() + 0.05
    tasks = []
    for arrival in arrivals:
        scheduled = start + arrival.at
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled, arrival.words)))
    return list(await asyncio.gather(*tasks))


async def run_all(args: argparse.Namespace, cluster: Cluster,
                  slices: list[list[Arrival]]) -> dict[str, list[Result]]:
    results: dict[str, list[Result]] = {policy: [] for policy in args.policies}
    async with Client(cluster.frontend, timeout=300) as client:
        await wait_ready(client, cluster, args.workers)
        for index, arrivals in enumerate(slices, 1):
            for policy in args.policies:
                began = time.monotonic()
                got = await play(client, policy, arrivals)
                results[policy].extend(got)
                p99 = percentile([r.latency for r in got], 0.99)
                print(f"  slice {index}/{len(slices)} {policy:<13} {len(got):5d} requests "
                      f"in {time.monotonic() - began:5.1f} s, p99 {p99 * 1000:7.1f} ms",
                      file=sys.stderr, flush=True)
                stats = await client.stats()
                if stats["broker"]["inflight"]:
                    raise SystemExit(f"the broker still holds {stats['broker']['inflight']} "
                                     "requests after a slice")
        cluster.check_alive()
    return results


# --- reporting ----------------------------------------------------------------------------


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest rank."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs (nproc), {model}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def report(args: argparse.Namespace, results: dict[str, list[Result]], loads: tuple) -> str:
    long_words = args.short_words * args.long_factor
    lines = [
        "| policy | requests | p50 ms | p99 ms | max ms | short p99 ms | long p99 ms | "
        "per worker (min-max) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    p99 = {}
    for policy, got in results.items():
        latencies = [r.latency for r in got]
        short = [r.latency for r in got if r.words == args.short_words]
        long = [r.latency for r in got if r.words == long_words]
        counts = [sum(r.worker == f"w{i}" for r in got) for i in range(1, args.workers + 1)]
        p99[policy] = percentile(latencies, 0.99)
        lines.append(
            f"| {policy} | {len(got)} | {ms(percentile(latencies, 0.5))} | {ms(p99[policy])} | "
            f"{ms(max(latencies))} | {ms(percentile(short, 0.99))} | "
            f"{ms(percentile(long, 0.99))} | {min(counts)}-{max(counts)} | "
            f"{sum(not r.ok for r in got)} |")
    lines.append("")
    if "least_loaded" in p99:
        for other, target in TARGETS.items():
            if other in p99:
                ratio = p99["least_loaded"] / p99[other]
                verdict = "met" if ratio <= target else "MISSED"
                lines.append(f"least_loaded / {other} p99: {ratio:.2f} "
                             f"(target <= {target}: {verdict})")
    lags = [r.lag for got in results.values() for r in got]
    lines.append(f"sender lag: p99 {ms(percentile(lags, 0.99))} ms, max {ms(max(lags))} ms; "
                 f"load average before/after: {loads[0]:.2f} / {loads[1]:.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30,
                        help="seconds of arrivals played for each policy (default: 30)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default: 4)")
    parser.add_argument("--capacity", type=int, default=0,
                        help="--capacity of each worker, 0 for unlimited (default: 0)")
    parser.add_argument("--word-time", type=float, default=0.01,
                        help="seconds of exclusive compute per word (default: 0.01)")
    parser.add_argument("--short-words", type=int, default=2,
                        help="words in a short request (default: 2)")
    parser.add_argument("--long-factor", type=int, default=10,
                        help="a long request has this many times the words (default: 10)")
    parser.add_argument("--long-fraction", type=float, default=0.1,
                        help="the share of long requests (default: 0.1)")
    parser.add_argument("--load", type=float, default=0.8,
                        help="offered load, as a fraction of the workers' capacity (default: 0.8)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="slices the arrival sequence is cut into, each played for "
                             "every policy before the next (default: 3)")
    parser.add_argument("--seed", type=int, default=1, help="arrival sequence seed (default: 1)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"comma-separated (default: {','.join(POLICIES)})")
    args = parser.parse_args(argv)
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = set(args.policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; valid: {', '.join(POLICIES)}")
    if args.workers < 1 or args.rounds < 1 or args.duration <= 0 or not 0 < args.load < 1:
        parser.error("need --workers >= 1, --rounds >= 1, --duration > 0 and 0 < --load < 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    slices = workload(args)
    total = sum(len(s) for s in slices)
    words = sum(a.words for s in slices for a in s)
    command = " ".join(["python scripts/bench_routing.py", *map(shlex.quote, sys.argv[1:])])
    print(f"command: {command}")
    print(f"machine: {machine()}")
    print(f"model:   {args.workers} workers, one compute token each, {args.word_time * 1000:g} ms "
          f"of it per word (processor sharing by word); capacity "
          f"{args.capacity or 'unlimited'}")
    print(f"load:    {args.short_words}-word requests, {args.long_fraction:.0%} of them "
          f"{args.short_words * args.long_factor} words; Poisson arrivals at "
          f"{arrival_rate(args):.1f}/s = {args.load:.0%} of capacity (this sequence: "
          f"{words * args.word_time / (args.duration * args.workers):.1%}); {total} requests "
          f"over {args.duration:g} s per policy, seed {args.seed}, {args.rounds} round(s)")
    print(flush=True)

    cluster = Cluster(args)
    loads = [os.getloadavg()[0]]
    try:
        cluster.start()
        results = asyncio.run(run_all(args, cluster, slices))
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.stop()
    loads.append(os.getloadavg()[0])
    print()
    print(report(args, results, tuple(loads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
