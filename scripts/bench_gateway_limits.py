#!/usr/bin/env python3
"""What hostile and careless HTTP clients cost one gateway: connections, latency, memory.

    .venv/bin/python scripts/bench_gateway_limits.py [--scenario idle bodies readers]
                                                     [--tree DIR] [--gateway-arg=--Frontend.KEY=V]

Each scenario starts its own broker, worker and gateway (`zroute` processes on free
loopback ports). The gateway starts with a soft open-file limit of 1,024, the common
default; the script raises its own to its hard limit, for the client sockets.

  idle     4,000 connections that send nothing and 1,000 that send a request head one
           byte a second (--idle, --slow), all at once. Before, and while they are held,
           a probe sends 200 requests one at a time, each on a new connection, as a user
           would: its latency p50 and p99, and how many failed (2 s timeout each). Also
           the connections the gateway holds (its open descriptors) when the probe ends.
  bodies   300 clients send a 1 MiB body each, all at once: their statuses and the
           gateway's peak RSS.
  readers  200 clients each ask for a 16 MiB reply and read none of it, for 40 s (past
           Frontend.send_timeout's default, 30 s): their outcomes and the gateway's peak
           RSS.

Every client is bounded: the script ends its connections at the end of each scenario.
With --tree DIR every process runs the code of that checkout instead (PYTHONPATH), to
measure before and after a change in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable

from children import free_port, start_group, stop_all

HANDLERS = Path(__file__).resolve().with_name("bench_handlers.py")
ZROUTE = str(Path(sys.executable).with_name("zroute"))
PROBE = b'{"text": "probe"}'


def common_fd_limit() -> None:
    """In the gateway's process, before exec: the soft open-file limit most systems give."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


class Stack:
    """A broker, one worker and one gateway; stopped together."""

    def __init__(self, tree: Path | None, handler: str | None, gateway_args: list[str],
                 log_dir: Path) -> None:
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        self.procs: list[subprocess.Popen] = []
        frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        self.port = free_port()

        def start(name: str, *args: str, **options: Any) -> subprocess.Popen:
            log = open(log_dir / f"{name}.log", "wb")
            proc = start_group([ZROUTE, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                               **options)
            self.procs.append(proc)
            return proc

        start("broker", "broker", "--frontend", frontend, "--backend", backend)
        start("worker", "worker", "--broker", backend, "--id", "worker-1",
              "--Backend.sleep_time=0", *(["--handler", handler] if handler else []))
        self.gateway = start("gateway", "gateway", "--broker", frontend, "--port",
                             str(self.port), "--log-level", "warning", *gateway_args,
                             before_exec=common_fd_limit)

    def stop(self) -> None:
        stop_all(self.procs)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class PeakRss:
    """The largest RSS of a process, sampled every 20 ms while a block of code runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)
        self._task: asyncio.Task | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib(self.pid))
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._task.cancel()


def post(body: bytes, path: str = "/generate") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def exchange(port: int, request: bytes, timeout: float) -> bytes:
    """Send a request on a new connection; the reply, read until the gateway closes."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                            timeout)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def status_of(reply: bytes) -> str:
    line = reply.split(b"\r\n", 1)[0].split()
    return line[1].decode() if len(line) > 1 else "closed"


async def wait_serving(port: int) -> None:
    """Until /health says a worker is registered."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            if status_of(await exchange(port, request, 2)) == "200":
                return
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"the gateway on port {port} did not serve within 30 s")


async def probe(port: int, requests: int = 200) -> dict:
    """`requests` requests one at a time, each on a new connection: latency and failures."""
    latencies, errors = [], Counter()
    for _ in range(requests):
        started = time.monotonic()
        try:
            status = status_of(await exchange(port, post(PROBE), 2))
        except (OSError, asyncio.TimeoutError) as e:
            status = type(e).__name__
        if status == "200":
            latencies.append(time.monotonic() - started)
        else:
            errors[status] += 1
    latencies.sort()
    return {"ok": len(latencies), "failed": dict(errors),
            "p50 ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
            "p99 ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2)
            if latencies else None}


async def idle(stack: Stack, args: argparse.Namespace) -> dict:
    idle_count, slow_count = args.idle, args.slow
    alone = await probe(stack.port)
    held: list[asyncio.StreamWriter] = []
    failed = 0
    for _ in range(idle_count + slow_count):
        try:
            held.append((await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", stack.port), 2))[1])
        except (OSError, asyncio.TimeoutError):
            failed += 1
    slow_head = b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100

    async def trickle(writer: asyncio.StreamWriter) -> None:
        for byte in slow_head:
            writer.write(bytes([byte]))
            await asyncio.sleep(1)

    trickles = [asyncio.create_task(trickle(w)) for w in held[idle_count:]]
    async with PeakRss(stack.gateway.pid) as peak:
        beside = await probe(stack.port)
        held_by_gateway = descriptors(stack.gateway.pid)
    for task in trickles:
        task.cancel()
    for writer in held:
        writer.close()
    return {"probe alone": alone, "connections opened": len(held), "not opened": failed,
            "gateway descriptors": held_by_gateway, "probe beside them": beside,
            "peak RSS MiB": round(peak.peak, 1)}


async def bodies(stack: Stack, _: argparse.Namespace, clients: int = 300,
                 size: int = 1 << 20) -> dict:
    head = b'{"text": "a", "pad": "'
    body = head + b"x" * (size - len(head) - 2) + b'"}'  # exactly Frontend.max_body

    async def one() -> str:
        try:
            return status_of(await exchange(stack.port, post(body), 60))
        except (OSError, asyncio.TimeoutError) as e:
            return type(e).__name__

    before = rss_mib(stack.gateway.pid)
    async with PeakRss(stack.gateway.pid) as peak:
        statuses = Counter(await asyncio.gather(*(one() for _ in range(clients))))
    return {"statuses": dict(statuses), "RSS before MiB": round(before, 1),
            "peak RSS MiB": round(peak.peak, 1)}


async def readers(stack: Stack, _: argparse.Namespace, clients: int = 200,
                  hold_s: float = 40) -> dict:
    """Clients that ask for a large reply and read none of it, for `hold_s` seconds."""
    outcomes: Counter = Counter()

    async def one() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", stack.port))
            await loop.sock_sendall(sock, post(b"{}"))
            await asyncio.sleep(hold_s)
            sock.settimeout(0)
            received = 0
            while chunk := sock.recv(1 << 20):  # what the kernel kept for it
                received += len(chunk)
            outcomes["still open"] += 1
        except BlockingIOError:
            outcomes["still open"] += 1
        except ConnectionResetError:
            outcomes["reset by the gateway"] += 1
        except OSError as e:
            outcomes[type(e).__name__] += 1
        finally:
            sock.close()

    before = rss_mib(stack.gateway.pid)
    async with PeakRss(stack.gateway.pid) as peak:
        await asyncio.gather(*(one() for _ in range(clients)))
    return {"outcomes": dict(outcomes), "RSS before MiB": round(before, 1),
            "peak RSS MiB": round(peak.peak, 1)}


SCENARIOS: dict[str, tuple[Callable[..., Awaitable[dict]], str | None]] = {
    "idle": (idle, None),
    "bodies": (bodies, None),
    "readers": (readers, f"{HANDLERS}:large_reply"),
}


async def run(scenario: str, args: argparse.Namespace) -> dict:
    measure, handler = SCENARIOS[scenario]
    with tempfile.TemporaryDirectory() as logs:
        stack = Stack(args.tree, handler, args.gateway_arg, Path(logs))
        try:
            await wait_serving(stack.port)
            return await measure(stack, args)
        finally:
            stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS),
                        default=list(SCENARIOS))
    parser.add_argument("--tree", type=Path, help="run the code of this checkout")
    parser.add_argument("--idle", type=int, default=4000, help="idle connections (4000)")
    parser.add_argument("--slow", type=int, default=1000,
                        help="connections sending a head a byte a second (1000)")
    parser.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                        help="an argument for the gateway, e.g. "
                             "--gateway-arg=--Frontend.max_buffered_bytes=33554432")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # for the client sockets
    print(f"code: {args.tree or 'this checkout'}; gateway args: {args.gateway_arg or 'none'}")
    for scenario in args.scenario:
        started = time.monotonic()
        result = asyncio.run(run(scenario, args))
        print(f"{scenario} ({time.monotonic() - started:.0f} s): {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
