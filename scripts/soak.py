#!/usr/bin/env python3
"""Soak test: steady load on a broker and workers while workers (and the broker) get killed.

    .venv/bin/python scripts/soak.py --duration 60 --workers 4 --kill-every 3 --kill-broker

It starts `zroute broker` and N `zroute worker` processes on free ports, keeps C
requests in flight through the Python client, and every few seconds SIGKILLs a
random worker (restarting it under the same id a moment later). With
--kill-broker it also kills and restarts the broker now and then. At the end it
prints the outcome of every request: a request either succeeds with the exact
reply or ends with a visible error; none may hang.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from broker.client import BrokerError, Client, BlockingClient

ZROUTE = str(Path(sys.executable).with_name("zroute"))
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
HANG_GRACE_S = 5.0  # past its own timeout, a request that has not ended counts as hung


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Cluster:
    def __init__(self, workers: int, sleep_time: float) -> None:
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        self.sleep_time = sleep_time
        self.broker: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.first_rss: dict[str, int | None] = {}
        self.restarts = collections.Counter()
        self.retries_before_broker_kills = 0
        self.start_broker()
        for i in range(1, workers + 1):
            self.start_worker(f"worker-{i}")

    def _spawn(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([ZROUTE, *args, "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start_broker(self) -> None:
        self.broker = self._spawn("broker", "--frontend", self.frontend, "--backend", self.backend)

    def start_worker(self, worker_id: str) -> None:
        self.workers[worker_id] = self._spawn(
            "worker", "--broker", self.backend, "--id", worker_id,
            f"--Backend.sleep_time={self.sleep_time}")

    def processes(self) -> dict[str, subprocess.Popen]:
        return {"broker": self.broker, **self.workers}

    def record_rss(self) -> dict[str, int | None]:
        return {name: rss_kib(proc.pid) for name, proc in self.processes().items()}

    def kill(self, name: str) -> None:
        proc = self.processes()[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.restarts[name] += 1

    def stop(self) -> None:
        for proc in self.processes().values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes().values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_ready(cluster: Cluster, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with BlockingClient(cluster.frontend) as client:
        while time.monotonic() < deadline:
            try:
                workers = client.stats(timeout=1)["workers"]
                if sum(w["state"] == "ready" for w in workers) >= count:
                    return
            except BrokerError:
                pass
            time.sleep(0.1)
    raise SystemExit(f"soak: {count} workers did not register within {timeout} s")


async def load(cluster: Cluster, concurrency: int, duration: float, timeout: float,
               outcomes: collections.Counter) -> None:
    """Keep `concurrency` requests in flight until `duration` has passed."""
    stop_at = time.monotonic() + duration
    rng = random.Random(1)
    async with Client(cluster.frontend, timeout=timeout) as client:
        async def one_loop() -> None:
            while time.monotonic() < stop_at:
                words = rng.sample(WORDS, rng.randint(2, 5))
                expected = b"".join(f"Hello {w}!\n".encode() for w in words)
                outcomes["requests"] += 1
                try:
                    reply = await asyncio.wait_for(
                        client.round_robin("generate", {"text": ",".join(words)}).read(),
                        timeout + HANG_GRACE_S)
                except asyncio.TimeoutError:
                    outcomes["hung"] += 1
                    continue
                except BrokerError as e:
                    outcomes[f"error {e.code}"] += 1
                    await asyncio.sleep(0.05)  # as a real client would before trying again
                    continue
                outcomes["success" if reply == expected else "wrong reply"] += 1

        await asyncio.gather(*(one_loop() for _ in range(concurrency)))


async def chaos(cluster: Cluster, duration: float, kill_every: float, broker_every: float | None,
                restart_delay: float) -> None:
    stop_at = time.monotonic() + duration - restart_delay
    next_broker_kill = time.monotonic() + broker_every if broker_every else float("inf")
    rng = random.Random(2)
    while time.monotonic() + kill_every < stop_at:
        await asyncio.sleep(kill_every)
        if time.monotonic() >= next_broker_kill:
            cluster.retries_before_broker_kills += broker_retries(cluster)
            cluster.kill("broker")
            await asyncio.sleep(restart_delay)
            cluster.start_broker()
            next_broker_kill = time.monotonic() + broker_every
            continue
        victim = rng.choice(sorted(cluster.workers))
        cluster.kill(victim)
        await asyncio.sleep(restart_delay)
        cluster.start_worker(victim)


def broker_retries(cluster: Cluster) -> int:
    with BlockingClient(cluster.frontend) as client:
        try:
            return client.stats(timeout=2)["broker"]["retries"]
        except BrokerError:
            return 0


async def soak(args: argparse.Namespace, cluster: Cluster) -> collections.Counter:
    outcomes: collections.Counter = collections.Counter()
    await asyncio.gather(
        load(cluster, args.concurrency, args.duration, args.timeout, outcomes),
        chaos(cluster, args.duration, args.kill_every,
              args.broker_every if args.kill_broker else None, args.restart_delay))
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--sleep-time", type=float, default=0.05, help="worker delay per word")
    parser.add_argument("--timeout", type=float, default=10, help="deadline of each request")
    parser.add_argument("--kill-every", type=float, default=3, help="seconds between kills")
    parser.add_argument("--restart-delay", type=float, default=0.5)
    parser.add_argument("--kill-broker", action="store_true", help="kill the broker too")
    parser.add_argument("--broker-every", type=float, default=15,
                        help="with --kill-broker, seconds between broker kills (default 15)")
    args = parser.parse_args()

    cluster = Cluster(args.workers, args.sleep_time)
    try:
        wait_ready(cluster, args.workers)
        rss_start = cluster.record_rss()
        started = time.monotonic()
        outcomes = asyncio.run(soak(args, cluster))
        elapsed = time.monotonic() - started
        rss_end = cluster.record_rss()
        retries = cluster.retries_before_broker_kills + broker_retries(cluster)
    finally:
        cluster.stop()

    print(f"\nsoak: {elapsed:.0f} s, {args.workers} workers, {args.concurrency} in flight, "
          f"worker kills {sum(v for k, v in cluster.restarts.items() if k != 'broker')}, "
          f"broker kills {cluster.restarts['broker']}")
    print(f"  requests          {outcomes['requests']}")
    print(f"  successes         {outcomes['success']}")
    print(f"  retried by broker {retries}  (sent again before their first chunk)")
    for key in sorted(k for k in outcomes if k.startswith("error ")):
        print(f"  visible {key:<28}{outcomes[key]}")
    print(f"  wrong replies     {outcomes['wrong reply']}")
    print(f"  hung              {outcomes['hung']}  (must be 0)")
    print("  RSS KiB at start -> end (a restarted process is a new one):")
    for name in rss_start:
        note = f"  restarted {cluster.restarts[name]}x" if cluster.restarts[name] else ""
        print(f"    {name:<10} {rss_start[name]} -> {rss_end.get(name)}{note}")
    ok = outcomes["hung"] == 0 and outcomes["wrong reply"] == 0
    print("PASS" if ok else "FAIL: requests hung or replies were wrong")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
