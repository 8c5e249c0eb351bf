#!/usr/bin/env python3
"""Peak memory of the broker, a worker and a gateway under loads that try to make them buffer.

    .venv/bin/python scripts/bench_memory.py [--duration 15] [--loads unread,http,big]
        [--compare-tree DIR ...]

Each load runs against a fresh `zroute broker`, one `zroute worker` (bench_handlers.py's sized_reply)
and, for `http`, one `zroute gateway`, all on free loopback ports, for --duration seconds;
a thread reads every process's RSS from /proc ten times a second. Beside the load, one
well-behaved client sends small requests in a loop: its failures are counted, and must
be 0. The loads:

- unread: 200 ZeroMQ clients each ask for a 16 MiB reply (256 chunks of 64 KiB) and never
  read it (a DEALER with a receive queue of one message and a 4 KiB kernel buffer);
- http:   300 concurrent HTTP POSTs of 1,000,000-byte bodies through the gateway, in a
  loop, each answered after 0.2 s;
- big:    20 ZeroMQ clients sending 8 MiB requests in a loop.

--compare-tree runs the same loads against the code of another checkout (PYTHONPATH set
to it), taking turns, for before-and-after figures in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from children import free_port, start_group, stop_all

HANDLERS = Path(__file__).resolve().with_name("bench_handlers.py")
ROOT = HANDLERS.parent.parent
ZROUTE = str(Path(sys.executable).with_name("zroute"))
MIB = 1 << 20
UNREAD_CLIENTS, UNREAD_CHUNKS, CHUNK_SIZE = 200, 256, 64 << 10
HTTP_CONCURRENCY, HTTP_BODY = 300, 1_000_000
BIG_CLIENTS, BIG_BODY = 20, 8 << 20


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Stack:
    """A broker, a worker and (optionally) a gateway running the code of `tree`."""

    def __init__(self, tree: Path | None, gateway: bool) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        backend = f"tcp://127.0.0.1:{free_port()}"
        self.procs: dict[str, subprocess.Popen] = {}
        self._spawn("broker", "broker", "--frontend", self.frontend, "--backend", backend)
        self._spawn("worker", "worker", "--broker", backend, "--id", "w1",
                    "--handler", f"{HANDLERS}:sized_reply")
        self.http = None
        if gateway:
            port = free_port()
            self.http = f"http://127.0.0.1:{port}/generate"
            self._spawn("gateway", "gateway", "--broker", self.frontend, "--port", str(port))

    def _spawn(self, name: str, *args: str) -> None:
        self.procs[name] = start_group([ZROUTE, *args, "--log-level", "error"], env=self.env,
                                       cwd=ROOT, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        from zroute.client import BlockingClient, BrokerError
        deadline = time.monotonic() + 20
        with BlockingClient(self.frontend) as client:
            while time.monotonic() < deadline:
                try:
                    if client.stats(timeout=1)["broker"]["workers_ready"]:
                        break
                except BrokerError:
                    pass
                time.sleep(0.1)
            else:
                raise SystemExit("bench_memory: the worker did not register within 20 s")
        if self.http:
            wait_http(self.http)

    def stop(self) -> None:
        stop_all(self.procs.values())


def wait_http(url: str) -> None:
    import urllib.request
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url.replace("/generate", "/health"), timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("bench_memory: the gateway did not answer within 20 s")


class RssSampler(threading.Thread):
    """Every process's RSS ten times a second: its peak, and what it was at the end."""

    def __init__(self, procs: dict[str, subprocess.Popen]) -> None:
        super().__init__(daemon=True)
        self.pids = {name: proc.pid for name, proc in procs.items()}
        self.peak = collections.Counter()
        self.last: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.sample()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.last[name] = status_kib(pid, "VmRSS")
            self.peak[name] = max(self.peak[name], self.last[name], status_kib(pid, "VmHWM"))


async def well_behaved(frontend: str, stop_at: float, counts: collections.Counter) -> None:
    """One client's small requests in a loop, beside the load: none may fail."""
    from zroute.client import BrokerError, Client
    async with Client(frontend, timeout=10) as client:
        while time.monotonic() < stop_at:
            try:
                reply = await client.round_robin("generate", {"size": 10}).read()
                counts["normal ok" if reply == b"x" * 10 else "normal wrong"] += 1
            except BrokerError as e:
                counts[f"normal {e.code}"] += 1
            await asyncio.sleep(0.01)


async def unread_load(stack: Stack, stop_at: float, counts: collections.Counter) -> None:
    import orjson
    import zmq
    from zroute import protocol as p
    context = zmq.Context()
    body = orjson.dumps({"chunks": UNREAD_CHUNKS, "size": CHUNK_SIZE})
    sockets = []
    for n in range(UNREAD_CLIENTS):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(stack.frontend)
        request = p.Request(b"r%d" % n, "generate", body, "", "", int(60_000))
        sock.send_multipart(p.encode_request_to_broker(request))
        sockets.append(sock)
    counts["unread requests"] = len(sockets)
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    for sock in sockets:
        sock.close()
    context.term()


async def http_load(stack: Stack, stop_at: float, counts: collections.Counter) -> None:
    import aiohttp
    pad = "p" * (HTTP_BODY - 40)
    body = f'{{"sleep": 0.2, "size": 10, "pad": "{pad}"}}'.encode()
    assert len(body) <= HTTP_BODY

    async def one_loop(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            try:
                async with session.post(stack.http, data=body) as response:
                    await response.read()
                    counts[f"http {response.status}"] += 1
            except aiohttp.ClientError as e:
                counts[f"http {type(e).__name__}"] += 1

    connector = aiohttp.TCPConnector(limit=HTTP_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one_loop(session) for _ in range(HTTP_CONCURRENCY)))


async def big_load(stack: Stack, stop_at: float, counts: collections.Counter) -> None:
    from zroute.client import BrokerError, Client
    body = b'{"size": 10, "pad": "' + b"p" * (BIG_BODY - 30) + b'"}'

    async def one_loop() -> None:
        async with Client(stack.frontend, timeout=30) as client:
            while time.monotonic() < stop_at:
                try:
                    await client.round_robin("generate", body).read()
                    counts["big ok"] += 1
                except BrokerError as e:
                    counts[f"big {e.code}"] += 1

    await asyncio.gather(*(one_loop() for _ in range(BIG_CLIENTS)))


def held_bytes(frontend: str) -> dict[str, int]:
    """What the broker says it holds at the end of the load, in MiB (if it says)."""
    from zroute.client import BlockingClient
    with BlockingClient(frontend) as client:
        stats = client.stats(timeout=5)["broker"]
    return {f"held {key} MiB": round(stats[key] / MIB) for key in ("body_bytes", "reply_bytes")
            if key in stats}


LOADS = {"unread": unread_load, "http": http_load, "big": big_load}


def run_one(load: str, tree: Path | None, duration: float) -> tuple[RssSampler, collections.Counter]:
    stack = Stack(tree, gateway=load == "http")
    counts: collections.Counter = collections.Counter()
    try:
        stack.wait_ready()
        sampler = RssSampler(stack.procs)
        sampler.start()
        stop_at = time.monotonic() + duration

        async def both() -> None:
            await asyncio.gather(LOADS[load](stack, stop_at, counts),
                                 well_behaved(stack.frontend, stop_at, counts))

        asyncio.run(both())
        counts.update(held_bytes(stack.frontend))
        sampler.sample()
        sampler.done.set()
        sampler.join()
    finally:
        stack.stop()
    return sampler, counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15, help="seconds per load (default 15)")
    parser.add_argument("--loads", default=",".join(LOADS), help="comma-separated: " + ", ".join(LOADS))
    parser.add_argument("--compare-tree", type=Path, nargs="+", default=[], metavar="DIR",
                        help="run the loads against these checkouts too, taking turns")
    args = parser.parse_args()
    trees: list[Path | None] = [None, *(t.resolve() for t in args.compare_tree)]
    print(f"machine: {os.cpu_count()} CPUs; loads of {args.duration:g} s")
    print("| load | code | broker peak / end MiB | worker peak / end MiB | gateway peak / end MiB "
          "| outcomes |")
    print("|---|---|---|---|---|---|")
    failed = 0
    for load in args.loads.split(","):
        for tree in trees:
            sampler, counts = run_one(load, tree, args.duration)
            cells = [f"{sampler.peak[name] / 1024:.0f} / {sampler.last[name] / 1024:.0f}"
                     if name in sampler.peak else "" for name in ("broker", "worker", "gateway")]
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            print(f"| {load} | {tree.name if tree else 'this tree'} | {' | '.join(cells)} "
                  f"| {outcomes} |", flush=True)
            failed += sum(v for k, v in counts.items()
                          if k.startswith("normal") and k != "normal ok")
    print(f"failures of the well-behaved client: {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
