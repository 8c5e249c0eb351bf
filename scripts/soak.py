#!/usr/bin/env python3
"""Soak test: steady load on a broker and workers while workers (and the broker) get killed.

    .venv/bin/python scripts/soak.py --duration 60 --workers 4 --kill-every 3 --kill-broker

It starts `zroute broker` and N `zroute worker` processes on free ports, keeps C
requests in flight through the Python client, and every few seconds SIGKILLs a
random worker (restarting it under the same id a moment later). With
--kill-broker it also kills and restarts the broker now and then. At the end it
prints the outcome of every request: a request either succeeds with the exact
reply or ends with a visible error; none may hang.

--brokers N runs N brokers, each worker registered with all of them and the client
spreading its requests over them; --kill-broker then kills them in turn. A request
that had no chunk when its broker died goes through another: no request may fail
before its first chunk with broker_unreachable.

    .venv/bin/python scripts/soak.py --duration 60 --brokers 2 --kill-broker --broker-every 5

--hostile KIND (repeatable) runs a hostile peer beside the load, at a bounded rate:

    .venv/bin/python scripts/soak.py --duration 60 --kill-every 0 --hostile all

With --hostile, every request of the normal load must succeed: a hostile peer may cost
only itself (--kill-every 0 leaves out the kills, whose visible errors are expected).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import zmq

from children import free_port, start_group, stop_all
from zroute import protocol as p
from zroute.client import BrokerError, Client, BlockingClient
from zroute_cli.serve import broker_names

ZROUTE = str(Path(sys.executable).with_name("zroute"))
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
HANG_GRACE_S = 5.0  # past its own timeout, a request that has not ended counts as hung


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Cluster:
    def __init__(self, workers: int, sleep_time: float, brokers: int = 1,
                 capacity: int = 0) -> None:
        self.frontends = [f"tcp://127.0.0.1:{free_port()}" for _ in range(brokers)]
        self.backends = [f"tcp://127.0.0.1:{free_port()}" for _ in range(brokers)]
        self.frontend, self.backend = self.frontends[0], self.backends[0]  # hostile peers'
        self.sleep_time = sleep_time
        self.capacity = capacity  # of each worker; 0: unlimited
        self.brokers: dict[str, subprocess.Popen] = {}
        self.workers: dict[str, subprocess.Popen] = {}
        self.first_rss: dict[str, int | None] = {}
        self.restarts = collections.Counter()
        self.retries_before_broker_kills = 0
        self.log_dir = tempfile.TemporaryDirectory(prefix="zroute-soak-")
        self.logs: dict[str, Path] = {}  # of the current process of each name
        for name in self.broker_names():
            self.start_broker(name)
        for i in range(1, workers + 1):
            self.start_worker(f"worker-{i}")

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        """Start a process, logging to a file of its own (a restarted one to a new file)."""
        log = Path(self.log_dir.name) / f"{name}-{self.restarts[name]}.log"
        self.logs[name] = log
        with open(log, "wb") as out:
            return start_group([ZROUTE, *args, "--log-level", "warning"],
                               stdout=out, stderr=subprocess.STDOUT)

    def broker_names(self) -> list[str]:
        return broker_names(len(self.frontends))

    def start_broker(self, name: str) -> None:
        index = self.broker_names().index(name)
        self.brokers[name] = self._spawn(name, "broker", "--frontend", self.frontends[index],
                                         "--backend", self.backends[index])

    def start_worker(self, worker_id: str) -> None:
        brokers = [flag for backend in self.backends for flag in ("--broker", backend)]
        self.workers[worker_id] = self._spawn(
            worker_id, "worker", *brokers, "--id", worker_id, "--capacity", str(self.capacity),
            f"--Backend.sleep_time={self.sleep_time}")

    def processes(self) -> dict[str, subprocess.Popen]:
        return {**self.brokers, **self.workers}

    def record_rss(self) -> dict[str, int | None]:
        return {name: rss_kib(proc.pid) for name, proc in self.processes().items()}

    def kill(self, name: str) -> None:
        proc = self.processes()[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.restarts[name] += 1

    def stop(self) -> list[str]:
        """Stop every process; what went wrong in the ending of each (the ones killed on
        purpose were replaced and are not among them): an exit code other than 0, or a
        traceback in its log."""
        stop_all(self.processes().values(), timeout=15)
        problems = []
        for name, proc in self.processes().items():
            log = self.logs[name].read_text(errors="replace")
            if proc.returncode != 0 or "Traceback" in log:
                problems.append(f"{name} exited with code {proc.returncode}; its log ends:\n"
                                f"{log[-2000:]}")
        self.log_dir.cleanup()
        return problems


def wait_ready(cluster: Cluster, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with BlockingClient(cluster.frontends) as client:
        while time.monotonic() < deadline:
            try:
                brokers = client.stats(timeout=1)["brokers"]
                if all(b["reachable"] and b["workers_ready"] >= count for b in brokers):
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
    async with Client(cluster.frontends, timeout=timeout) as client:
        async def one_loop() -> None:
            while time.monotonic() < stop_at:
                words = rng.sample(WORDS, rng.randint(2, 5))
                expected = b"".join(f"Hello {w}!\n".encode() for w in words)
                outcomes["requests"] += 1
                chunks: list[bytes] = []
                try:
                    await asyncio.wait_for(
                        read_into(client.round_robin("generate", {"text": ",".join(words)}),
                                  chunks), timeout + HANG_GRACE_S)
                except asyncio.TimeoutError:
                    outcomes["hung"] += 1
                    continue
                except BrokerError as e:
                    when = "streaming" if chunks else "before its first chunk"
                    outcomes[f"error {e.code} {when}"] += 1
                    await asyncio.sleep(0.05)  # as a real client would before trying again
                    continue
                outcomes["success" if b"".join(chunks) == expected else "wrong reply"] += 1

        await asyncio.gather(*(one_loop() for _ in range(concurrency)))


async def read_into(stream, chunks: list[bytes]) -> None:
    """Read a stream into `chunks`: what came before an error stays there."""
    async for chunk in stream:
        chunks.append(chunk)


# --- hostile peers ---------------------------------------------------------------------


def raw_dealer(context: zmq.Context, address: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100)
    sock.connect(address)
    return sock


def send(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Send if the peer's queue has room; a hostile peer does not wait."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass


def discard(sock: zmq.Socket) -> None:
    while sock.poll(0):
        sock.recv_multipart()


async def every(interval: float, stop_at: float):
    while time.monotonic() < stop_at:
        yield
        await asyncio.sleep(interval)


async def malformed(cluster: Cluster, context: zmq.Context, stop_at: float) -> int:
    """Garbage, truncated commands and broken BATCHes, to both of the broker's sockets."""
    socks = [raw_dealer(context, cluster.frontend), raw_dealer(context, cluster.backend)]
    rng = random.Random(3)
    sent = 0
    async for _ in every(0.01, stop_at):
        for sock in socks:
            for frames in ([os.urandom(rng.randint(0, 64))], [p.VERSION, p.REQUEST, b"r"],
                           [p.VERSION, b"\xff", b"x"], [p.VERSION, p.BATCH, os.urandom(32)],
                           [b"ZR9", p.HEARTBEAT], [p.VERSION, p.CHUNK, b"", b"", b""]):
                send(sock, frames)
                sent += 1
            discard(sock)
    return sent


async def oversized(cluster: Cluster, context: zmq.Context, stop_at: float) -> int:
    """Messages of too many frames, bodies over Broker.max_request_bytes, and frames over
    Broker.max_message_size (the broker drops that connection: a new one each time)."""
    client = raw_dealer(context, cluster.frontend)
    worker = raw_dealer(context, cluster.backend)
    too_many = [p.VERSION, p.REQUEST, b"r"] + [b"x"] * p.MAX_FRAMES
    big_body = p.encode_request_to_broker(p.Request(b"big", "generate", b"x" * (2 << 20)))
    sent = 0
    async for _ in every(0.1, stop_at):
        send(client, too_many)
        send(client, big_body)
        send(worker, too_many)
        huge = raw_dealer(context, cluster.frontend)
        send(huge, [p.VERSION, p.STATS, b"x" * ((8 << 20) + 1)])
        await asyncio.sleep(0.05)
        huge.close()
        discard(client)
        discard(worker)
        sent += 4
    return sent


BAD_NAMES = ["\x1b[31mred", "line\nbreak", "nul\x00", "x" * 300, "", "tab\there"]


async def bad_ready(cluster: Cluster, context: zmq.Context, stop_at: float) -> int:
    """READYs whose worker id or services are not valid names."""
    sock = raw_dealer(context, cluster.backend)
    sent = 0
    async for _ in every(0.02, stop_at):
        for name in BAD_NAMES:
            info = orjson.dumps({"services": ["generate"], "capacity": 1})
            send(sock, [p.VERSION, p.READY, name.encode(), info])
            bad_service = orjson.dumps({"services": [name], "capacity": 1})
            send(sock, [p.VERSION, p.READY, b"hostile-worker", bad_service])
            sent += 2
        discard(sock)
    return sent


async def stats_loop(cluster: Cluster, context: zmq.Context, stop_at: float) -> int:
    """STATS as fast as the broker answers, from one client."""
    sock = raw_dealer(context, cluster.frontend)
    sent = 0
    async for _ in every(0.002, stop_at):
        send(sock, p.encode_stats_request(p.StatsRequest(b"s%d" % sent)))
        sent += 1
        discard(sock)
    return sent


async def slow_reader(cluster: Cluster, context: zmq.Context, stop_at: float) -> int:
    """Clients that ask for large replies and never read them."""
    socks = []
    for _ in range(20):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.connect(cluster.frontend)
        socks.append(sock)
    body = orjson.dumps({"text": ",".join(["word"] * 50_000)})
    sent = 0
    async for _ in every(1.0, stop_at):
        for sock in socks:
            send(sock, p.encode_request_to_broker(p.Request(b"r%d" % sent, "generate", body)))
            sent += 1
    for sock in socks:
        sock.close()
    return sent


async def impostor(cluster: Cluster, context: zmq.Context, stop_at: float) -> int:
    """READYs under the ids of the real workers, each from a new connection, with no token
    or a wrong one: the broker must refuse them while the workers are alive."""
    sent = 0
    async for _ in every(0.1, stop_at):
        for worker_id in cluster.workers:
            sock = raw_dealer(context, cluster.backend)
            token = os.urandom(16).hex() if sent % 2 else ""
            send(sock, p.encode_ready(p.Ready(worker_id, ["generate"], 1, token)))
            sent += 1
            await asyncio.sleep(0.02)
            sock.close()
    return sent


HOSTILE = {"malformed": malformed, "oversized": oversized, "bad-ready": bad_ready,
           "stats-loop": stats_loop, "slow-reader": slow_reader, "impostor": impostor}


async def hostile_peers(cluster: Cluster, kinds: list[str], stop_at: float) -> dict[str, int]:
    """Run every hostile kind until stop_at; how many messages each sent."""
    context = zmq.Context()
    try:
        sent = await asyncio.gather(*(HOSTILE[kind](cluster, context, stop_at) for kind in kinds))
    finally:
        context.destroy(0)
    return dict(zip(kinds, sent))


async def chaos(cluster: Cluster, duration: float, kill_every: float, broker_every: float | None,
                restart_delay: float) -> None:
    stop_at = time.monotonic() + duration - restart_delay
    next_broker_kill = time.monotonic() + broker_every if broker_every else float("inf")
    rng = random.Random(2)
    brokers = itertools.cycle(cluster.broker_names())  # killed in turn
    while kill_every and time.monotonic() + kill_every < stop_at:
        await asyncio.sleep(kill_every)
        if time.monotonic() >= next_broker_kill:
            victim = next(brokers)
            cluster.retries_before_broker_kills += broker_retries(cluster, victim)
            cluster.kill(victim)
            await asyncio.sleep(restart_delay)
            cluster.start_broker(victim)
            next_broker_kill = time.monotonic() + broker_every
            continue
        victim = rng.choice(sorted(cluster.workers))
        cluster.kill(victim)
        await asyncio.sleep(restart_delay)
        cluster.start_worker(victim)


def broker_retries(cluster: Cluster, name: str | None = None) -> int:
    """The retries counted by the broker `name`, or by all of them."""
    frontends = (cluster.frontends if name is None
                 else cluster.frontends[cluster.broker_names().index(name)])
    with BlockingClient(frontends) as client:
        try:
            return client.stats(timeout=2)["broker"]["retries"]
        except BrokerError:
            return 0


async def soak(args: argparse.Namespace, cluster: Cluster
               ) -> tuple[collections.Counter, dict[str, int]]:
    outcomes: collections.Counter = collections.Counter()
    _, _, hostile_sent = await asyncio.gather(
        load(cluster, args.concurrency, args.duration, args.timeout, outcomes),
        chaos(cluster, args.duration, args.kill_every,
              args.broker_every if args.kill_broker else None, args.restart_delay),
        hostile_peers(cluster, args.hostile, time.monotonic() + args.duration))
    return outcomes, hostile_sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--capacity", type=int, default=0,
                        help="requests each worker runs at once, from all brokers together "
                             "(default 0: unlimited); more wait in the brokers' queues")
    parser.add_argument("--sleep-time", type=float, default=0.05, help="worker delay per word")
    parser.add_argument("--timeout", type=float, default=10, help="deadline of each request")
    parser.add_argument("--kill-every", type=float, default=3,
                        help="seconds between kills; 0 kills nothing")
    parser.add_argument("--restart-delay", type=float, default=0.5)
    parser.add_argument("--brokers", type=int, default=1,
                        help="brokers, each worker registered with all (default 1)")
    parser.add_argument("--kill-broker", action="store_true",
                        help="kill the broker too (with --brokers, each in turn)")
    parser.add_argument("--broker-every", type=float, default=15,
                        help="with --kill-broker, seconds between broker kills (default 15)")
    parser.add_argument("--hostile", action="append", default=[],
                        choices=[*HOSTILE, "all"], metavar="KIND",
                        help="run a hostile peer beside the load (repeatable): "
                             f"{', '.join(HOSTILE)}, or all")
    args = parser.parse_args()
    if "all" in args.hostile:
        args.hostile = list(HOSTILE)

    cluster = Cluster(args.workers, args.sleep_time, args.brokers, args.capacity)
    try:
        wait_ready(cluster, args.workers)
        rss_start = cluster.record_rss()
        started = time.monotonic()
        outcomes, hostile_sent = asyncio.run(soak(args, cluster))
        elapsed = time.monotonic() - started
        rss_end = cluster.record_rss()
        retries = cluster.retries_before_broker_kills + broker_retries(cluster)
    finally:
        endings = cluster.stop()

    broker_kills = sum(cluster.restarts[name] for name in cluster.broker_names())
    print(f"\nsoak: {elapsed:.0f} s, {args.brokers} broker(s), {args.workers} workers, "
          f"{args.concurrency} in flight, capacity {args.capacity or 'unlimited'}, worker kills "
          f"{sum(cluster.restarts[name] for name in cluster.workers)}, "
          f"broker kills {broker_kills}")
    print(f"  requests          {outcomes['requests']}")
    print(f"  successes         {outcomes['success']}")
    print(f"  retried by broker {retries}  (sent again before their first chunk)")
    for key in sorted(k for k in outcomes if k.startswith("error ")):
        print(f"  visible {key:<48}{outcomes[key]}")
    # With several brokers, a lost broker's requests without a chunk go through another.
    lost_before_first_chunk = outcomes[f"error {p.E_BROKER_UNREACHABLE} before its first chunk"]
    if args.brokers > 1:
        print(f"  broker_unreachable before a first chunk: {lost_before_first_chunk}  (must be 0)")
    print(f"  wrong replies     {outcomes['wrong reply']}")
    print(f"  hung              {outcomes['hung']}  (must be 0)")
    failures = outcomes["requests"] - outcomes["success"]
    if args.hostile:
        print(f"  failures of the normal load beside hostile peers: {failures}  (must be 0)")
        for kind, sent in hostile_sent.items():
            print(f"    hostile {kind:<12} sent {sent} messages")
    print("  RSS KiB at start -> end (a restarted process is a new one):")
    for name in rss_start:
        note = f"  restarted {cluster.restarts[name]}x" if cluster.restarts[name] else ""
        print(f"    {name:<10} {rss_start[name]} -> {rss_end.get(name)}{note}")
    for problem in endings:
        print(f"  {problem}")
    ok = outcomes["hung"] == 0 and outcomes["wrong reply"] == 0 and not endings
    ok = ok and not (args.hostile and failures)
    ok = ok and not (args.brokers > 1 and lost_before_first_chunk)
    print("PASS" if ok else "FAIL: requests hung, replies were wrong, a process did not end "
                            "cleanly, hostile peers cost the normal load requests, or a lost "
                            "broker's request failed before its first chunk")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
