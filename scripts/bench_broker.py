#!/usr/bin/env python3
"""Benchmark the zroute broker: Python clients -> broker -> workers, with baselines.

What runs (all on this machine, real processes, loopback TCP or --transport ipc):

  calibration  plain pyzmq, a sync DEALER with 256 requests in flight against a ROUTER
               echo process: no zroute code, a measure of how fast the machine is now.
  zroute       `zroute broker` and N `zroute worker --Backend.sleep_time=0` subprocesses;
               P client processes (multiprocessing, spawn), each with its own asyncio
               loop and its own zroute.client.Client, keeping C/P requests in flight.
  brokerless   the same client against ONE server process that runs the worker runtime
               (worker.runtime.Worker, the greeting handler, its per-request tasks and
               its chunk batching) on a ROUTER socket that speaks the client protocol.
               Same client code, same worker code, no broker in between: the
               difference is the cost of the broker hop.
  majortomo    the MDP/0.2 broker from PyPI with its own Broker, Worker and Client
               classes, installed by this script into .bench-venv/ (a separate virtual
               environment, gitignored). Its workers serve one request at a time and
               stream the 3 lines as 2 PARTIAL replies and a FINAL one (the target's
               comparison); "mt-onefinal" rows send all 3 in one FINAL instead, for
               reference. Its client has one request outstanding, so concurrency =
               client processes.
  half load    zroute and brokerless again, open loop (requests sent on a clock, not
               when a reply comes), at the same rate: half of zroute's best throughput,
               and a light load (0.1 of it). The p50 difference is the latency that
               the broker hop adds.
  brokers      with --brokers 1,2, the zroute rows with 1 and with 2 brokers (each worker
               and each client on both), taking turns, side by side, and the CPU per
               request of each process: what N brokers would carry with more cores.
  curve        with --curve, the zroute rows again with CURVE on every socket
               (zroute+curve: keys from `zroute keys`), taking turns with the plaintext
               ones, and side by side with them, CPU per request included.
  compared     with --compare-tree DIR, the zroute rows (broker, workers and clients, at
               the same concurrencies and open-loop rates) run the code of the checkout
               DIR too (a `git worktree` of another commit), taking turns with this
               one's, and are printed side by side with them.

Every request is the seed's body {"text": "world,universe,galaxy"}: 3 words, so 3
chunks ("Hello world!\\n", ...). Throughput counts requests completed inside the
measured window (after a warm-up); latency is from sending the request to its last
chunk. CPU columns are % of one core per role over the same window (Linux /proc);
"other" is what processes outside the benchmark used meanwhile. A measurement that
other processes disturbed is taken again (--retries), and (!) marks one that stayed
disturbed: on a shared machine, read those rows with care.

Examples:
  python scripts/bench_broker.py                      # full run, a few minutes
  python scripts/bench_broker.py --quick              # one configuration each, ~30 s
  python scripts/bench_broker.py --concurrency 64,512 --procs 2,3 --duration 5
  python scripts/bench_broker.py --profile            # py-spy broker, worker, client
  python scripts/bench_broker.py --quick --curve      # with and without CURVE, in turns
  python scripts/bench_broker.py --quick --brokers 1,2 --no-brokerless --no-majortomo
  git worktree add /tmp/before HEAD~1                 # then, before against after:
  python scripts/bench_broker.py --quick --compare-tree /tmp/before

Run it with the project's virtualenv python (it has pyzmq and the other dependencies).
Every process that runs zroute code imports it from its checkout, this one or a
--compare-tree one, never from another. Every process it starts is stopped at the end,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import zmq

from checkouts import ROOT, Tree, client_module, client_options, git_commit, import_from
from children import die_with_parent, free_port, start_group

BODY = b'{"text": "world,universe,galaxy"}'
EXPECTED_CHUNKS = 3
GREETING = "Hello"
SERVICE = "generate"
BENCH_VENV = ROOT / ".bench-venv"
BASELINE_PACKAGES = ["majortomo", "six"]

MACHINE = "_machine"
BUSY_LIMIT = 15.0  # % of one core used by other processes that counts as a quiet machine

TARGET_RPS = 25_000
TARGET_RATIO = 4.0
TARGET_HOP_MS = 0.2

# --- process bookkeeping ---------------------------------------------------------

def _child_init() -> None:
    """First thing in every multiprocessing child: leave Ctrl-C to the parent, and stop
    if the benchmark dies without cleaning up (e.g. SIGKILL)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


class Processes:
    """Every process the benchmark starts, so that all of them can be stopped."""

    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []

    def popen(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = start_group(argv, **kwargs)
        self.items.append((name, proc))
        return proc

    def spawn(self, name: str, ctx, target, args: tuple) -> mp.Process:
        proc = ctx.Process(target=target, args=args, name=name, daemon=True)
        proc.start()
        self.items.append((name, proc))
        return proc

    def stop(self, procs: list | None = None, timeout: float = 5.0) -> None:
        """SIGTERM, wait, then SIGKILL what is left."""
        chosen = [(n, x) for n, x in self.items if procs is None or x in procs]
        for _, proc in chosen:
            if _alive(proc):
                proc.terminate()
        deadline = time.monotonic() + timeout
        for name, proc in chosen:
            _wait(proc, max(0.0, deadline - time.monotonic()))
            if _alive(proc):
                print(f"  ({name} ignored SIGTERM; killing it)", file=sys.stderr)
                proc.kill()
                _wait(proc, 2.0)
        self.items = [(n, x) for n, x in self.items if (n, x) not in chosen]


class ServerGone(RuntimeError):
    """A broker, worker or server process ended in the middle of the benchmark."""


def check_servers(procs: Processes, servers: dict[str, list[int]]) -> None:
    """Raise ServerGone if a process of `servers` has exited (something killed it)."""
    pids = {pid for group in servers.values() for pid in group}
    gone = [f"{name} (pid {proc.pid}, exit code "
            f"{proc.returncode if isinstance(proc, subprocess.Popen) else proc.exitcode})"
            for name, proc in procs.items if proc.pid in pids and not _alive(proc)]
    if gone:
        raise ServerGone(", ".join(gone) + " exited")


class Stack:
    """Server processes that can be started again: `start()` -> (address, pids, processes)."""

    def __init__(self, procs: Processes, start) -> None:
        self.procs, self._start = procs, start
        self.address, self.pids, self.members = start()

    def restart(self) -> None:
        self.procs.stop(self.members)
        self.address, self.pids, self.members = self._start()

    def stop(self) -> None:
        """Last started first: workers before their broker, which they would say has gone."""
        for member in reversed(self.members):
            self.procs.stop([member])


def _alive(proc) -> bool:
    return proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()


def _wait(proc, timeout: float) -> None:
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    else:
        proc.join(timeout)


_IPC_DIR: list[str] = []


def new_endpoint(transport: str) -> str:
    """A fresh endpoint: a free loopback TCP port, or a socket file in a temporary folder."""
    if transport == "ipc":
        if not _IPC_DIR:
            _IPC_DIR.append(tempfile.mkdtemp(prefix="zroute-bench-"))
        return f"ipc://{_IPC_DIR[0]}/{free_port()}.sock"
    return f"tcp://127.0.0.1:{free_port()}"


# --- checkouts -----------------------------------------------------------------------


def tree_child_init(tree: str) -> None:
    """First thing in a child process that runs project code (it starts with the parent's
    sys.path): _child_init, and the project imported from the checkout `tree`."""
    _child_init()
    import_from(tree)


def in_tree(tree: Tree, function, *args):
    """function(*args) in a child process that imports the project from `tree`."""
    with mp.get_context("spawn").Pool(1, initializer=tree_child_init,
                                      initargs=(str(tree.path),)) as pool:
        return pool.apply(function, args)


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process and all its threads (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process: Python's thread vs libzmq's I/O thread."""
    threads: dict[str, float] = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                data = f.read()
            name = data[data.index("(") + 1:data.rindex(")")]
            fields = data.rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            threads[name] = threads.get(name, 0.0) + seconds
    except (OSError, ValueError, IndexError):
        pass
    return threads


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs, Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def cpu_snapshot(pids: dict[str, list[int]]) -> dict[str, float]:
    snap = {role: sum(cpu_seconds(pid) or 0.0 for pid in group) for role, group in pids.items()}
    snap[MACHINE] = machine_busy_seconds()
    return snap


def cpu_percentages(before: dict, after: dict, client_cpu: float, seconds: float) -> dict[str, float]:
    """% of one core per role; "other" is what the rest of the machine used meanwhile."""
    cpu = {role: 100 * (after[role] - before[role]) / seconds for role in before if role != MACHINE}
    cpu["clients"] = 100 * client_cpu / seconds
    cpu["other"] = max(0.0, 100 * (after[MACHINE] - before[MACHINE]) / seconds - sum(cpu.values()))
    return cpu


def wait_for_quiet_machine(limit: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes use less than `limit` % of one core.

    Returns the last figure seen.
    """
    deadline = time.monotonic() + max_wait
    said = False
    while True:
        before = machine_busy_seconds()
        time.sleep(0.5)
        busy = 200 * (machine_busy_seconds() - before)
        if busy <= limit:
            return busy
        if time.monotonic() >= deadline:
            print(f"  WARNING: other processes use {busy:.0f}% of a core; figures will be low "
                  "(see the 'other' CPU column)", flush=True)
            return busy
        if not said:
            print(f"  (other processes use {busy:.0f}% of a core; waiting up to {max_wait:g} s "
                  "for them to finish)", flush=True)
            said = True


def measure_on(stack: "Stack", args, run) -> "Result":
    """measure(run(stack)); if a server process died meanwhile, start the servers again
    (once) and measure again."""
    try:
        return measure(args, lambda: run(stack))
    except ServerGone as e:
        print(f"  WARNING: {e}: starting the servers again, measuring again", flush=True)
        stack.restart()
        return measure(args, lambda: run(stack))


def measure(args, run) -> "Result":
    """The median (by req/s) of --repeat measurements."""
    results = sorted((measure_once(args, run) for _ in range(args.repeat)), key=lambda r: r.rps)
    chosen = results[(len(results) - 1) // 2]
    if len(results) > 1:
        chosen.note = (chosen.note + " " if chosen.note else "") + (
            "median of " + "/".join(f"{r.rps:,.0f}" for r in results))
    return chosen


def measure_once(args, run) -> "Result":
    """One measurement; measured again (up to --retries times) if other processes used
    the CPUs meanwhile. The least disturbed attempt is kept."""
    chosen = None
    for attempt in range(1 + args.retries):
        if attempt:
            wait_for_quiet_machine(BUSY_LIMIT, args.quiet_wait)
        result = run()
        other = result.cpu.get("other", 0.0)
        if chosen is None or other < chosen.cpu.get("other", 0.0):
            chosen = result
        if other <= BUSY_LIMIT:
            break
        if attempt < args.retries:
            print(f"  (other processes used {other:.0f}% of a core during this one: "
                  f"{result.rps:,.0f} req/s; measuring again)", flush=True)
    return chosen


# --- results -----------------------------------------------------------------------


@dataclass
class Result:
    system: str
    procs: int
    concurrency: int
    duration: float
    count: int = 0
    chunks: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list, repr=False)
    cpu: dict[str, float] = field(default_factory=dict)  # role -> % of one core
    note: str = ""
    label: str = ""  # which open-loop rate, e.g. "0.5 x best"
    target_rate: float = 0.0

    @property
    def rps(self) -> float:
        return self.count / self.duration

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.duration

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def p50(self) -> float:
        return self.percentile(0.50)

    @property
    def cpu_us_per_request(self) -> float:
        """CPU time of the benchmark's own processes (clients, broker, workers) per
        request, in microseconds."""
        own = sum(share for role, share in self.cpu.items() if role != "other") / 100
        return own * self.duration / self.count * 1e6 if self.count else float("nan")

    @property
    def p99(self) -> float:
        return self.percentile(0.99)

    def line(self) -> str:
        cpu = " ".join(f"{k} {v:.0f}" for k, v in self.cpu.items())
        if self.cpu.get("other", 0) > BUSY_LIMIT:
            cpu += " (!)"
        conc = "open" if self.target_rate else str(self.concurrency)
        return (f"{self.system:<15} {self.procs:>5} {conc:>5} {self.rps:>9,.0f} "
                f"{self.chunks_per_s:>9,.0f} {self.p50:>7.2f} {self.p99:>7.2f} {self.errors:>6}  "
                f"{cpu}{''.join('  ' + t for t in (self.label, self.note) if t)}")


HEADER = (f"{'system':<15} {'procs':>5} {'conc':>5} {'req/s':>9} {'chunks/s':>9} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6}  CPU % of one core")


# --- zroute client processes ---------------------------------------------------------


def zroute_client_main(tree, keys, address, mode, load, warmup, duration, index, queue, go,
                       start) -> None:
    """One client process: its own zmq context, event loop and Client, from the checkout
    `tree`, with the CURVE keys in the directory `keys` ("": none).

    mode "closed": keep `load` requests in flight. mode "open": send `load` requests per
    second on a clock, whatever the replies do.
    """
    tree_child_init(tree)
    try:
        asyncio.run(_zroute_client(keys, address, mode, load, warmup, duration, index, queue, go,
                                   start))
    except Exception as e:  # report instead of leaving the parent waiting
        queue.put(("error", index, f"{type(e).__name__}: {e}"))


async def _zroute_client(keys, address, mode, load, warmup, duration, index, queue, go,
                         start) -> None:
    client_api = client_module()
    BrokerError = client_api.BrokerError
    client = client_api.Client(address, timeout=30.0, **client_options(keys))
    client.connect()

    async def one() -> int:
        n = 0
        async for _ in client.request(SERVICE, BODY):
            n += 1
        return n

    got = await asyncio.wait_for(one(), 20)
    if got != EXPECTED_CHUNKS:
        queue.put(("error", index, f"warm-up request got {got} chunks, not {EXPECTED_CHUNKS}"))
        return
    queue.put(("ready", index, os.getpid()))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    t_start = start.value
    t_from = t_start + warmup
    t_to = t_from + duration
    latencies = array("d")
    stats = {"count": 0, "chunks": 0, "errors": 0, "cpu": 0.0}

    async def request(t0: float | None = None) -> None:
        t0 = t0 or time.monotonic()  # open loop: from when the request was due
        n = 0
        failed = False
        try:
            async for _ in client.request(SERVICE, BODY):
                n += 1
        except BrokerError:
            failed = True
        t1 = time.monotonic()
        if t_from <= t1 < t_to:
            if failed or n != EXPECTED_CHUNKS:
                stats["errors"] += 1
            else:
                stats["count"] += 1
                stats["chunks"] += n
                latencies.append(t1 - t0)

    async def closed_loop() -> None:
        while time.monotonic() < t_to:
            await request()

    async def open_loop(rate: float) -> None:
        tasks = set()
        sent = 0
        while True:
            now = time.monotonic()
            if now >= t_to:
                break
            due = int((now - t_start) * rate) - sent
            for _ in range(due):
                task = loop.create_task(request(now))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent += max(due, 0)
            # Sleep until the next request is due (the loop's timers have ~1 ms steps, so
            # at high rates requests leave in small bursts).
            await asyncio.sleep(max(0.0, t_start + (sent + 1) / rate - time.monotonic()))
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    async def cpu_meter() -> None:
        await asyncio.sleep(max(0.0, t_from - time.monotonic()))
        before = time.process_time()
        await asyncio.sleep(max(0.0, t_to - time.monotonic()))
        stats["cpu"] = time.process_time() - before

    await asyncio.sleep(max(0.0, t_start - time.monotonic()))
    meter = loop.create_task(cpu_meter())
    if mode == "closed":
        await asyncio.gather(*(closed_loop() for _ in range(int(load))))
    else:
        await open_loop(float(load))
    await meter
    await client.close()
    queue.put(("result", index, {**stats, "latencies": latencies.tobytes()}))


def run_zroute_clients(procs: Processes, system: str, tree: Tree, address: str, nprocs: int,
                       mode: str, total_load: float, args, servers: dict[str, list[int]],
                       on_window=None, on_window_end=None) -> Result:
    """Start `nprocs` client processes of `tree`, measure one window, collect their results.

    `on_window(client_pids)` and `on_window_end()` are called when the measured window
    begins and ends (the profiler uses them).
    """
    ctx = mp.get_context("spawn")
    queue, go, start = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    if mode == "closed":  # C requests in flight over P processes, spread as evenly as can be
        loads = [int(total_load) // nprocs + (i < int(total_load) % nprocs) for i in range(nprocs)]
    else:
        loads = [total_load / nprocs] * nprocs
    children = [procs.spawn(f"client-{i}", ctx, zroute_client_main,
                            (str(tree.path), str(tree.keys or ""), address, mode, loads[i],
                             args.warmup, args.duration, i, queue, go, start))
                for i in range(nprocs)]
    try:
        client_pids = []
        for _ in range(nprocs):
            kind, index, payload = queue.get(timeout=60)
            if kind != "ready":
                raise RuntimeError(f"client process {index}: {payload}")
            client_pids.append(payload)
        check_servers(procs, servers)
        start.value = time.monotonic() + 0.05
        go.set()
        t_from = start.value + args.warmup
        time.sleep(max(0.0, t_from - time.monotonic()))
        before = cpu_snapshot(servers)
        if on_window is not None:
            on_window(client_pids)
        time.sleep(max(0.0, t_from + args.duration - time.monotonic()))
        after = cpu_snapshot(servers)
        if on_window_end is not None:
            on_window_end()
        result = Result(system, nprocs, int(total_load) if mode == "closed" else 0, args.duration)
        client_cpu = 0.0
        for _ in range(nprocs):
            kind, index, payload = queue.get(timeout=args.duration + 60)
            if kind != "result":
                raise RuntimeError(f"client process {index}: {payload}")
            result.count += payload["count"]
            result.chunks += payload["chunks"]
            result.errors += payload["errors"]
            result.latencies.extend(array("d", payload["latencies"]))
            client_cpu += payload["cpu"]
        result.cpu = cpu_percentages(before, after, client_cpu, args.duration)
        check_servers(procs, servers)
        for child in children:
            child.join(10)
        return result
    finally:
        procs.stop(children)


# --- brokerless server ----------------------------------------------------------------


def direct_server_main(endpoint: str) -> None:
    """The worker runtime on a ROUTER socket that clients talk to directly."""
    tree_child_init(str(ROOT))
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_direct_server(endpoint))


async def _direct_server(endpoint: str) -> None:
    from zroute import protocol as p
    from zroute.channel import SOCKET_HWM, Channel
    from zroute.zmqio import send_to
    from worker.runtime import Worker
    from zroute.services import Instance
    from zroute.settings import BrokerLink
    from zroute_cli.config import builtin_graph, load_config

    config = load_config(None, [f"Backend.greeting={GREETING}", "Backend.sleep_time=0"])
    backend = builtin_graph().service("Backend")
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
    sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    boot_id = os.urandom(8)

    class BrokerStandIn:
        """The worker's transport, standing in for the broker: client REQUESTs and
        CANCELs reach the runtime as the broker would send them, and its replies go
        straight to their client.

        The runtime's request ids are the broker's tokens (client routing id + rid), so
        the reply finds its client the way the broker finds it.
        """

        def __init__(self) -> None:
            self.channel = Channel(sock, self.on_frames)
            self.to_worker = None

        def open(self, on_message, on_connected, on_disconnected) -> "BrokerStandIn":
            """The worker's TransportFactory: its connection is open at once."""
            self.to_worker = on_message
            asyncio.get_running_loop().call_soon(on_connected)
            return self

        def send(self, frames: list[bytes]) -> None:  # the runtime's outgoing messages
            command = frames[1]
            if command == p.HEARTBEAT:  # answered, as the broker does: it is not silent
                asyncio.get_running_loop().call_soon(
                    self.to_worker, p.encode_heartbeat(p.Heartbeat(boot_id)))
                return
            if command not in (p.CHUNK, p.END, p.ERROR):
                return  # READY, DRAIN...: nobody to tell
            peer, rid = p.split_request_token(frames[2])
            # Straight to the ROUTER: the channel's batching would put the peer frame
            # inside the batch.
            if command == p.ERROR:
                send_to(sock, peer, [p.VERSION, command, rid, *frames[3:]])
            else:
                send_to(sock, peer, [p.VERSION, command, rid, b"direct", *frames[3:]])
            self.channel.check_soon()

        def flush(self) -> None:
            """Nothing waits: send() sent each message as it came."""

        def unsent_bytes(self) -> int:
            return 0  # the clients read what they asked for

        def close(self, linger_ms: int) -> None:
            """The socket outlives the worker's connections."""

        def on_frames(self, frames: list[bytes]) -> None:
            peer = frames[0]
            try:
                for message in p.unbatch(frames[1:]):
                    self.on_message(peer, p.decode_from_client(message))
            except p.ProtocolError:
                return

        def on_message(self, peer: bytes, msg) -> None:
            if type(msg) is p.Request:
                token = p.request_token(peer, msg.rid)
                self.to_worker(p.encode_request_to_worker(p.Request(token, msg.service, msg.body)))
            elif type(msg) is p.Cancel:
                self.to_worker(p.encode_cancel(p.Cancel(p.request_token(peer, msg.rid))))
            elif type(msg) is p.Heartbeat:
                send_to(sock, peer, p.encode_heartbeat(p.Heartbeat(boot_id)))
                self.channel.check_soon()

    stand_in = BrokerStandIn()
    worker = Worker(config.backend, BrokerLink(endpoint), "direct",
                    Instance(backend, config.backend).bind(None).handlers(), context=context,
                    transport=stand_in.open)
    await worker.run()  # until SIGTERM


# --- calibration -----------------------------------------------------------------------


def echo_server_main(endpoint: str) -> None:
    _child_init()
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


def echo_calibration(procs: Processes, transport: str, seconds: float = 1.5) -> tuple[float, float]:
    """Plain pyzmq against a ROUTER echo process: no zroute code, a measure of the machine.

    Returns round-trips/s with 256 in flight (sync DEALER) and the p50 round trip in ms
    with one in flight, the least that one more process in a request's path can cost.
    """
    endpoint = new_endpoint(transport)
    server = procs.spawn("echo server", mp.get_context("spawn"), echo_server_main, (endpoint,))
    context = zmq.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(b"x")
        if not sock.poll(20_000):
            raise RuntimeError("the echo server did not answer")
        sock.recv()
        rtts = []
        t_end = time.monotonic() + seconds / 3
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            sock.send(b"x")
            sock.recv()
            rtts.append(time.perf_counter() - t0)
        rtts.sort()
        for _ in range(256):
            sock.send(b"x")
        count, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            for _ in range(1000):
                sock.recv()
                sock.send(b"x")
            count += 1000
        rate = count / (time.monotonic() - t0)
        sock.close()
        return rate, rtts[len(rtts) // 2] * 1000
    finally:
        context.term()
        procs.stop([server])


# --- zroute broker and workers ----------------------------------------------------------


def wait_for_workers(address: str, keys: str, count: int, timeout: float = 20.0) -> None:
    """Run in_tree: return once `count` workers are registered with the broker."""
    client_api = client_module()
    context = zmq.Context()
    deadline = time.monotonic() + timeout
    try:
        with client_api.BlockingClient(address, context=context,
                                       **client_options(keys)) as client:
            while True:
                try:
                    if ready_everywhere(client.stats(timeout=1.0)) >= count:
                        return
                except client_api.BrokerError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{count} workers did not register within {timeout:g} s")
                time.sleep(0.1)
    finally:
        context.term()


def ready_everywhere(stats: dict) -> int:
    """The workers ready on every broker (a checkout from before several brokers has one,
    and its stats no "brokers")."""
    if "brokers" in stats:
        return min(broker.get("workers_ready", 0) for broker in stats["brokers"])
    return sum(w["state"] == "ready" for w in stats["workers"])


def broker_totals(address: str, keys: str) -> dict:
    """Run in_tree: the broker's counts since it started."""
    context = zmq.Context()
    try:
        with client_module().BlockingClient(address, context=context,
                                            **client_options(keys)) as client:
            return client.stats(timeout=5.0)["broker"]
    finally:
        context.term()


def start_zroute(procs: Processes, tree: Tree, workers: int,
                 transport: str) -> tuple[str | list[str], dict, list]:
    """The tree's brokers and workers; the address the clients connect to (a list of
    endpoints for several brokers)."""
    fronts = [new_endpoint(transport) for _ in range(tree.brokers)]
    backs = [new_endpoint(transport) for _ in range(tree.brokers)]
    cmd = tree.command()
    pids: dict[str, list[int]] = {}  # by role: each broker's CPU is measured apart
    members = []
    for name, front, back in zip(broker_roles(tree.brokers), fronts, backs):
        broker = procs.popen(f"{tree.label} {name}",
                             [*cmd, "broker", "--frontend", front, "--backend", back,
                              "--log-level", "warning", *tree.curve_args("broker")],
                             cwd=tree.path)
        pids[name] = [broker.pid]
        members.append(broker)
    pids["workers"] = []
    brokers = [flag for back in backs for flag in ("--broker", back)]
    for i in range(workers):
        worker = procs.popen(f"{tree.label} worker w{i + 1}",
                             [*cmd, "worker", *brokers, "--id", f"w{i + 1}",
                              "--Backend.sleep_time=0", "--log-level", "warning",
                              *tree.curve_args("worker")], cwd=tree.path)
        pids["workers"].append(worker.pid)
        members.append(worker)
    address = fronts[0] if tree.brokers == 1 else fronts
    in_tree(tree, wait_for_workers, address, str(tree.keys or ""), workers)
    return address, pids, members


def broker_roles(count: int) -> list[str]:
    """The roles of a stack's brokers in the CPU columns: broker, or broker-1, broker-2..."""
    return ["broker"] if count == 1 else [f"broker-{i}" for i in range(1, count + 1)]


def start_direct_server(procs: Processes, transport: str) -> tuple[str, dict, list]:
    endpoint = new_endpoint(transport)
    server = procs.spawn("brokerless server", mp.get_context("spawn"), direct_server_main,
                         (endpoint,))
    return endpoint, {"server": [server.pid]}, [server]


# --- majortomo ---------------------------------------------------------------------------

# Runs in .bench-venv's python: majortomo's own Broker, Worker and Client.
MAJORTOMO_ROLES = r'''
import json, sys, time
role, url = sys.argv[1], sys.argv[2]
if role == "broker":
    from majortomo.broker import Broker
    Broker(bind=url).run()
elif role == "worker":
    from majortomo.worker import Worker
    worker = Worker(url, b"generate")
    worker.connect()
    greeting, replies = sys.argv[3], sys.argv[4]
    while True:
        client, frames = worker.wait_for_request()
        text = json.loads(frames[0])["text"]
        lines = [f"{greeting} {w.strip()}!\n".encode() for w in text.split(",") if w.strip()]
        if replies == "stream":
            for line in lines[:-1]:              # stream each line as it is made...
                worker.send_reply_partial(client, [line])
            worker.send_reply_final(client, lines[-1:])   # ...the last one ends the reply
        else:
            worker.send_reply_final(client, lines)   # all lines in one FINAL: no streaming
elif role == "client":
    from majortomo.client import Client
    body, expected = sys.argv[3].encode(), int(sys.argv[4])
    client = Client(url)
    client.connect()
    def one():
        client.send(b"generate", body)
        return len(client.recv_all_as_list(timeout=10))
    assert one() == expected, "warm-up request failed"
    print("ready", flush=True)
    start, warmup, duration = map(float, sys.stdin.readline().split())
    t_from, t_to = start + warmup, start + warmup + duration
    time.sleep(max(0.0, start - time.monotonic()))
    lat, count, chunks, errors, cpu0, cpu1 = [], 0, 0, 0, None, None
    while True:
        t0 = time.monotonic()
        if t0 >= t_to:
            break
        if cpu0 is None and t0 >= t_from:
            cpu0 = time.process_time()
        try:
            n = one()
        except Exception:
            n = -1
        t1 = time.monotonic()
        if t_from <= t1 < t_to:
            if n == expected:
                count += 1; chunks += n; lat.append(t1 - t0)
            else:
                errors += 1
    cpu1 = time.process_time()
    print(json.dumps({"count": count, "chunks": chunks, "errors": errors, "latencies": lat,
                      "cpu": cpu1 - (cpu0 if cpu0 is not None else cpu1)}), flush=True)
'''


def bench_python() -> Path:
    return BENCH_VENV / "bin" / "python"


def ensure_bench_venv(extra: list[str] = ()) -> str | None:
    """Create .bench-venv with majortomo (and extras); None if ready, else why not."""
    py = bench_python()
    needed = [*BASELINE_PACKAGES, *extra]
    probe = "import majortomo.broker, majortomo.worker, majortomo.client, six"
    if "py-spy" in extra:
        probe += "; import shutil, sys; assert (__import__('pathlib').Path(sys.executable).parent / 'py-spy').exists()"
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return None
    print(f"  installing {', '.join(needed)} into .bench-venv/ ...", flush=True)
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True,
                           capture_output=True, timeout=120)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *needed], check=True, capture_output=True, text=True, timeout=300)
        subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        lines = [ln for ln in (e.stderr or "").splitlines() if ln.strip() and "is ignored" not in ln]
        return lines[-1] if lines else f"{e.cmd[0]} failed with exit code {e.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None


MAJORTOMO_SYSTEMS = {"stream": "majortomo", "final": "mt-onefinal"}


def run_majortomo(procs: Processes, client_counts: list[int], workers: int, replies: str,
                  args) -> list[Result]:
    py = str(bench_python())
    url = new_endpoint(args.transport)
    broker = procs.popen("majortomo broker", [py, "-c", MAJORTOMO_ROLES, "broker", url])
    servers = {"broker": [broker.pid], "workers": []}
    for _ in range(workers):
        worker = procs.popen("majortomo worker",
                             [py, "-c", MAJORTOMO_ROLES, "worker", url, GREETING, replies])
        servers["workers"].append(worker.pid)
    system = MAJORTOMO_SYSTEMS[replies]
    members = [p for _, p in procs.items if p.pid in (broker.pid, *servers["workers"])]
    results = []
    try:
        for n in client_counts:
            results.append(measure(args, lambda: _majortomo_clients(procs, py, url, n, args,
                                                                    servers, system)))
            print("  " + results[-1].line(), flush=True)
    finally:
        procs.stop(members)
    return results


def _majortomo_clients(procs, py, url, n, args, servers, system) -> Result:
    clients = [procs.popen(f"majortomo client {i}",
                           [py, "-c", MAJORTOMO_ROLES, "client", url, BODY.decode(), str(EXPECTED_CHUNKS)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for i in range(n)]
    try:
        for c in clients:
            if c.stdout.readline().strip() != "ready":
                raise RuntimeError("a majortomo client failed its warm-up request")
        start = time.monotonic() + 0.05
        for c in clients:
            c.stdin.write(f"{start} {args.warmup} {args.duration}\n")
            c.stdin.flush()
        t_from = start + args.warmup
        time.sleep(max(0.0, t_from - time.monotonic()))
        before = cpu_snapshot(servers)
        time.sleep(max(0.0, t_from + args.duration - time.monotonic()))
        after = cpu_snapshot(servers)
        result = Result(system, n, n, args.duration)
        client_cpu = 0.0
        for c in clients:
            out, _ = c.communicate(timeout=args.duration + 30)
            payload = json.loads(out.strip().splitlines()[-1])
            result.count += payload["count"]
            result.chunks += payload["chunks"]
            result.errors += payload["errors"]
            result.latencies.extend(payload["latencies"])
            client_cpu += payload["cpu"]
        result.cpu = cpu_percentages(before, after, client_cpu, args.duration)
        check_servers(procs, servers)
        return result
    finally:
        procs.stop(clients)


# --- profiling ------------------------------------------------------------------------------


def profile_under_load(procs: Processes, tree: Tree, address: str, pids: dict[str, list[int]],
                       best: Result, args) -> None:
    """py-spy the broker, a worker and a client process while the best configuration runs."""
    problem = ensure_bench_venv(["py-spy"])
    pyspy = BENCH_VENV / "bin" / "py-spy"
    if problem or not pyspy.exists():
        print(f"  py-spy is not available: {problem}")
        return
    seconds = max(1, int(args.duration))
    out_dir = Path(args.profile_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {"broker": pids[broker_roles(tree.brokers)[0]][0], "worker w1": pids["workers"][0]}
    spies = {}

    threads_before: dict[str, tuple[float, dict[str, float]]] = {}
    threads_share: dict[str, dict[str, float]] = {}

    def start_spies(client_pids: list[int]) -> None:
        targets["client 1"] = client_pids[0]
        for role, pid in targets.items():
            threads_before[role] = (time.monotonic(), thread_cpu_seconds(pid))
            out = out_dir / f"{role.replace(' ', '-')}.txt"
            spies[role] = (out, procs.popen(
                f"py-spy on the {role}",
                [str(pyspy), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200",
                 "--format", "raw", "--output", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))

    def thread_shares() -> None:
        for role, (t0, before) in threads_before.items():
            after, elapsed = thread_cpu_seconds(targets[role]), time.monotonic() - t0
            threads_share[role] = {name: 100 * (after.get(name, cpu) - cpu) / elapsed
                                   for name, cpu in before.items()}

    long_args = SimpleNamespace(**{**vars(args), "duration": seconds + 1.0})
    result = run_zroute_clients(procs, tree.label, tree, address, best.procs, "closed",
                                best.concurrency, long_args, pids, on_window=start_spies,
                                on_window_end=thread_shares)
    print("  (under py-spy) " + result.line())
    print("  CPU per thread, % of one core (libzmq's I/O thread is ZMQbg/IO/0):")
    for role, shares in threads_share.items():
        busy = ", ".join(f"{name} {share:.0f}" for name, share in
                         sorted(shares.items(), key=lambda kv: -kv[1]) if share >= 0.5)
        print(f"    {role}: {busy or 'n/a (exited)'}")
    for role, (out, spy) in spies.items():
        try:
            _, err = spy.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            err = "timed out"
        if spy.returncode != 0 or not out.exists():
            print(f"  py-spy on the {role} failed: {(err or '').strip()[-300:]}")
            continue
        print(f"\n  {role}: busy {summarize_profile(out, seconds, 200)}")


def summarize_profile(path: Path, seconds: int, rate: int, top: int = 12) -> str:
    """Top functions by own (self) samples and by total samples, from py-spy raw output."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        samples += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n
    possible = seconds * rate
    lines = [f"{100 * samples / possible:.0f}% of the time ({samples} of ~{possible} samples, "
             f"idle excluded). Profile: {path}"]
    lines.append(f"    {'own %':>6} {'total %':>7}  function")
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / samples:6.1f} {100 * total[frame] / samples:7.1f}  {frame}")
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------


def parse_fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give fractions in (0, 1]")
    return values


def parse_replies(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or not set(values) <= set(MAJORTOMO_SYSTEMS):
        raise argparse.ArgumentTypeError(f"{text!r}: give stream, final or both")
    return values


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 1")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_broker.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, metavar="S",
                        help="measured seconds per configuration (default: 3)")
    parser.add_argument("--warmup", type=float, default=1.0, metavar="S",
                        help="unmeasured seconds before each measurement (default: 1)")
    parser.add_argument("--concurrency", type=parse_ints, default=[8, 64, 256], metavar="C,...",
                        help="requests in flight, in total over all client processes "
                             "(default: 8,64,256)")
    parser.add_argument("--procs", type=parse_ints, default=[1, 2, 4], metavar="P,...",
                        help="client processes, each with its own event loop and Client "
                             "(default: 1,2,4)")
    parser.add_argument("--transport", choices=("tcp", "ipc"), default="tcp",
                        help="loopback TCP ports, or Unix domain sockets (default: tcp)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="workers behind each broker (default: 2)")
    parser.add_argument("--majortomo-clients", type=parse_ints, default=[2, 4, 8, 16], metavar="N,...",
                        help="majortomo client processes, one request each in flight "
                             "(default: 2,4,8,16)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, metavar="S",
                        help="wait up to S seconds for other processes to leave the CPUs alone, "
                             "before the run and before a retry (default: 30). The 'other' CPU "
                             "column shows what they used during each measurement; (!) marks "
                             f"more than {BUSY_LIMIT:g}%% of a core")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="measure every configuration N times and keep the median by req/s "
                             "(default: 1); the machine's noise is large, see the docs")
    parser.add_argument("--retries", type=int, default=2, metavar="N",
                        help="measure a configuration again, up to N times, when other processes "
                             "were busy during it; the least disturbed attempt is kept (default: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="one configuration per system, 1 s each: a smoke run")
    parser.add_argument("--no-brokerless", action="store_true", help="skip the brokerless baseline")
    parser.add_argument("--no-majortomo", action="store_true", help="skip the majortomo baseline")
    parser.add_argument("--majortomo-replies", type=parse_replies, default=["stream", "final"],
                        metavar="MODE,...",
                        help="how majortomo's workers reply: 'stream' (a PARTIAL per line, the "
                             "last line in the FINAL; the target compares with this one) and/or "
                             "'final' (all lines in one FINAL, no streaming) (default: "
                             "stream,final)")
    parser.add_argument("--no-half-load", action="store_true", help="skip the open-loop latency step")
    parser.add_argument("--load-fractions", type=parse_fractions, default=[0.5, 0.1], metavar="F,...",
                        help="rates of the open-loop latency step, as fractions of zroute's best "
                             "throughput; the first one is the target's 'half load' "
                             "(default: 0.5,0.1)")
    parser.add_argument("--open-procs", type=int, default=1, metavar="P",
                        help="client processes of the open-loop step (default: 1, which adds "
                             "the least CPU contention on a small machine)")
    parser.add_argument("--profile", action="store_true",
                        help="also run py-spy (installed into .bench-venv/) on the broker, a "
                             "worker and a client process during the best zroute configuration, "
                             "and print their top functions")
    parser.add_argument("--profile-dir", default="bench-profiles", metavar="DIR",
                        help="where py-spy's raw profiles go (default: ./bench-profiles)")
    parser.add_argument("--curve", action="store_true",
                        help="also run this checkout's zroute rows with CURVE on every socket "
                             "(zroute+curve), taking turns with the plaintext ones, and print "
                             "them side by side")
    parser.add_argument("--brokers", type=parse_ints, default=[1], metavar="N,...",
                        help="brokers in this checkout's stack; several counts (1,2) run side "
                             "by side, taking turns, with the CPU per request of each process "
                             "(default: 1)")
    parser.add_argument("--compare-tree", type=Path, nargs="+", default=[], metavar="DIR",
                        help="also run the zroute rows with the code of these checkouts (a git "
                             "worktree of another commit, say), taking turns with this one's, "
                             "and print them side by side")
    args = parser.parse_args(argv)
    for tree in args.compare_tree:
        if not (tree / "pyproject.toml").is_file():
            parser.error(f"--compare-tree {tree}: not a zroute checkout (no pyproject.toml)")
    if args.quick:
        args.duration, args.warmup = min(args.duration, 1.0), min(args.warmup, 0.5)
        args.concurrency, args.procs, args.majortomo_clients = [64], [2], [4]
        args.load_fractions = args.load_fractions[:1]
    if (args.duration <= 0 or args.warmup < 0 or args.workers < 1 or args.retries < 0
            or args.open_procs < 1 or args.repeat < 1):
        parser.error("--duration must be > 0, --warmup >= 0, --workers, --open-procs, "
                     "--repeat >= 1, --retries >= 0")
    return args


def machine_line() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")


def code_version(tree: Tree) -> str:
    """The commit a checkout has, and whether the code measured differs from it."""
    commit = git_commit(tree.path)
    if not commit:
        return "unknown"
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "broker", "worker",
                                "zroute"], cwd=tree.path, text=True, capture_output=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        dirty = ""
    return commit + (" with uncommitted changes in broker/, worker/ or zroute/" if dirty else "")


def grid(args) -> list[tuple[int, int]]:
    return [(c, n) for c in args.concurrency for n in args.procs if n <= c]


def best_of(results: list[Result]) -> Result | None:
    valid = [r for r in results if r.count and not r.errors]
    return max(valid, key=lambda r: r.rps) if valid else None


def measure_zroute(procs: Processes, trees: list[Tree], closed: dict[Tree, list[Result]],
                   open_loop: dict[Tree, list[Result]], args) -> None:
    """The zroute rows of every checkout, taking turns, into `closed` and `open_loop`: the
    grid, a profile of this checkout's best, then the open-loop rates of this one's best."""
    print("zroute: Python clients -> zroute broker -> "
          f"{args.workers} zroute workers (separate processes)")
    if len(trees) > 1:
        print("  each configuration in turn with " + ", ".join(t.label for t in trees))
    print("  " + HEADER)
    stacks = {tree: Stack(procs, lambda tree=tree: start_zroute(procs, tree, args.workers,
                                                                args.transport))
              for tree in trees}
    for c, n in grid(args):
        for tree, stack in stacks.items():
            closed[tree].append(measure_on(stack, args, lambda s: run_zroute_clients(
                procs, tree.label, tree, s.address, n, "closed", c, args, s.pids)))
            print("  " + closed[tree][-1].line(), flush=True)
    this = trees[0]
    best = best_of(closed[this])
    if args.profile and best:
        print(f"\nprofile: py-spy at {this.label}'s best configuration "
              f"({best.procs} client procs, {best.concurrency} in flight)")
        try:
            profile_under_load(procs, this, stacks[this].address, stacks[this].pids, best, args)
        except ServerGone as e:
            print(f"  WARNING: {e}: no profile; starting the servers again", flush=True)
            stacks[this].restart()
    for tree, stack in stacks.items():
        totals = in_tree(tree, broker_totals, stack.address, str(tree.keys or ""))
        print(f"  {tree.label} broker totals: {totals['completed']} completed, "
              f"{totals['failed']} failed, {totals['timeouts']} timeouts, "
              f"{totals['retries']} retries")

    if best and not args.no_half_load:
        print(f"\nopen loop: requests sent at a fixed rate by {args.open_procs} client "
              f"process(es), fractions of {this.label}'s best")
        print("  " + HEADER)
        for fraction in args.load_fractions:
            rate = best.rps * fraction
            for tree, stack in stacks.items():
                r = measure_on(stack, args, lambda s: run_zroute_clients(
                    procs, tree.label, tree, s.address, args.open_procs, "open", rate, args,
                    s.pids))
                r.target_rate, r.label = rate, f"{fraction:g} x best"
                open_loop[tree].append(r)
                print("  " + r.line(), flush=True)
    for stack in stacks.values():
        stack.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Processes()
    broker_counts = [Tree.at(ROOT).with_brokers(n) for n in args.brokers]
    trees = [*broker_counts, *map(Tree.at, args.compare_tree)]
    if args.curve:
        trees.insert(1, trees[0].with_curve(Path(tempfile.mkdtemp(prefix="zroute-bench-keys-"))))
    print(f"machine: {machine_line()}")
    print(f"code: {code_version(trees[0])}")
    for tree in trees[1:]:
        print(f"compared with: {tree.label}, the checkout {tree.path} ({code_version(tree)})"
              + (", CURVE on every socket" if tree.keys else ""))
    print(f"request: {BODY.decode()} -> {EXPECTED_CHUNKS} chunks, workers sleep 0 s; "
          f"{args.workers} workers; {args.warmup:g} s warm-up + {args.duration:g} s measured "
          f"per configuration")
    wait_for_quiet_machine(BUSY_LIMIT, args.quiet_wait)
    try:
        echo, rtt = echo_calibration(procs, args.transport)
        print(f"calibration (plain pyzmq, no zroute code): DEALER->ROUTER echo process, "
              f"{echo:,.0f} round-trips/s with 256 in flight, p50 round trip {rtt:.3f} ms "
              "with 1 in flight")
    except (RuntimeError, zmq.ZMQError) as e:
        print(f"calibration failed: {e}")
    print()
    closed: dict[Tree, list[Result]] = {tree: [] for tree in trees}
    open_loop: dict[Tree, list[Result]] = {tree: [] for tree in trees}  # one per load fraction
    zroute, open_zroute = closed[trees[0]], open_loop[trees[0]]  # this checkout's
    direct: list[Result] = []
    majortomo: list[Result] = []
    open_direct: list[Result] = []  # brokerless at the same rates
    majortomo_note = ""
    status = 0
    try:
        measure_zroute(procs, trees, closed, open_loop, args)

        if not args.no_brokerless:
            print("\nbrokerless: the same Python clients -> ONE server process running the zroute "
                  "worker runtime\n  (greeting handler, a task per request, batched chunks) on a "
                  "ROUTER socket that speaks\n  the client protocol: no broker hop, no second worker")
            print("  " + HEADER)
            stack = Stack(procs, lambda: start_direct_server(procs, args.transport))
            for c, n in grid(args):
                direct.append(measure_on(stack, args, lambda s: run_zroute_clients(
                    procs, "brokerless", trees[0], s.address, n, "closed", c, args, s.pids)))
                print("  " + direct[-1].line(), flush=True)
            for z in open_zroute:
                r = measure_on(stack, args, lambda s: run_zroute_clients(
                    procs, "brokerless", trees[0], s.address, z.procs, "open", z.target_rate,
                    args, s.pids))
                r.target_rate, r.label = z.target_rate, z.label
                open_direct.append(r)
                print("  " + r.line(), flush=True)
            stack.stop()

        if not args.no_majortomo:
            print("\nmajortomo: MDP/0.2 broker from PyPI, its own Broker, Worker and Client; "
                  f"{args.workers} workers,\n  one request per client process (concurrency = "
                  "client processes).\n  majortomo: the 3 lines stream as 2 PARTIAL replies and "
                  "a FINAL one;\n  mt-onefinal: all 3 lines in one FINAL reply (no streaming)")
            problem = ensure_bench_venv()
            if problem:
                majortomo_note = f"skipped: installing majortomo failed: {problem}"
                print(f"  {majortomo_note}")
            else:
                print("  " + HEADER)
                for replies in args.majortomo_replies:
                    majortomo += run_majortomo(procs, args.majortomo_clients, args.workers,
                                               replies, args)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process started", file=sys.stderr)
        return 130
    except RuntimeError as e:  # a client failed, a server died twice...
        print(f"\nerror: {e}; stopping every process started", file=sys.stderr)
        status = 1
    finally:
        procs.stop()
        for folder in [*_IPC_DIR, *(tree.keys for tree in trees if tree.keys)]:
            shutil.rmtree(folder, ignore_errors=True)

    report(zroute, direct, majortomo, open_zroute, open_direct, majortomo_note)
    if len(trees) > 1:
        side_by_side(trees, closed, open_loop)
    if len(args.brokers) > 1:
        cpu_per_process(broker_counts, closed)
    return status


def report(zroute, direct, majortomo, open_zroute, open_direct, majortomo_note) -> None:
    print("\n=== all configurations ===")
    print(HEADER)
    for r in zroute + direct + majortomo:
        print(r.line())
    print("\n=== best of each ===")
    print(HEADER)
    bests = {name: best_of(rs) for name, rs in
             (("zroute", zroute), ("brokerless", direct),
              ("majortomo", [r for r in majortomo if r.system == "majortomo"]),
              ("mt-onefinal", [r for r in majortomo if r.system == "mt-onefinal"]))}
    for r in bests.values():
        if r:
            print(r.line())
    pairs = list(zip(open_zroute, open_direct))
    if open_zroute:
        print("\n=== open loop: the same rate for both; the broker hop is the p50 difference ===")
        print(HEADER)
        for i, z in enumerate(open_zroute):
            print(z.line())
            if i < len(pairs):
                d = pairs[i][1]
                print(d.line())
                print(f"{'':<15} broker hop at {z.target_rate:,.0f} req/s: {z.p50 - d.p50:+.2f} ms p50, "
                      f"{z.p99 - d.p99:+.2f} ms p99")

    print("\n=== targets ===")
    z, m, m1 = bests["zroute"], bests["majortomo"], bests["mt-onefinal"]

    def verdict(ok: bool | None) -> str:
        return "n/a " if ok is None else ("PASS" if ok else "MISS")

    rows = []
    rows.append((f"zroute >= {TARGET_RPS:,} req/s through the broker",
                 f"{z.rps:,.0f} req/s ({z.procs} procs, {z.concurrency} in flight)" if z else "no result",
                 verdict(z.rps >= TARGET_RPS if z else None)))
    if z and m:
        ratio = z.rps / m.rps
        rows.append((f"zroute >= {TARGET_RATIO:g}x majortomo at its best",
                     f"{ratio:.2f}x ({z.rps:,.0f} vs {m.rps:,.0f} req/s with {m.procs} clients)",
                     verdict(ratio >= TARGET_RATIO)))
    extra = []  # context, not targets
    if z and m1:
        extra.append(("zroute vs majortomo with one-FINAL replies",
                      f"{z.rps / m1.rps:.2f}x ({z.rps:,.0f} vs {m1.rps:,.0f} req/s with "
                      f"{m1.procs} clients)"))
    if not (z and m):
        rows.append((f"zroute >= {TARGET_RATIO:g}x majortomo at its best",
                     majortomo_note or "no majortomo result", verdict(None)))
    if pairs:
        z, d = pairs[0]
        hop = z.p50 - d.p50
        rows.append((f"broker hop <= {TARGET_HOP_MS:g} ms p50 at half load",
                     f"{hop:+.2f} ms ({z.p50:.2f} vs {d.p50:.2f} ms p50 at {z.target_rate:,.0f} "
                     f"req/s, {z.label})", verdict(hop <= TARGET_HOP_MS)))
    else:
        rows.append((f"broker hop <= {TARGET_HOP_MS:g} ms p50 at half load", "not measured",
                     verdict(None)))
    for zr, dr in pairs[1:]:
        extra.append((f"broker hop at {zr.label}",
                      f"{zr.p50 - dr.p50:+.2f} ms ({zr.p50:.2f} vs {dr.p50:.2f} ms p50 at "
                      f"{zr.target_rate:,.0f} req/s)"))
    for name, value, v in rows:
        print(f"{v}  {name:<44} {value}")
    for name, value in extra:
        print(f"{'':4}  {name:<44} {value}  (context, not a target)")


CONFIGURATION, CELL = 26, 38  # characters per column of the side-by-side table


def side_by_side(trees: list[Tree], closed: dict[Tree, list[Result]],
                 open_loop: dict[Tree, list[Result]]) -> None:
    """The zroute rows of every checkout, one line per configuration, and how each other
    checkout's compares with this one's: req/s in the closed loop, p50 at the same rate."""
    print("\n=== zroute of each checkout (and with CURVE), taking turns; (!) marks a disturbed "
          "or failed run ===")
    for tree in trees:
        print(f"{tree.label}: {tree.path}" + (", CURVE on every socket" if tree.keys else ""))
    print((" " * CONFIGURATION + "".join(tree.label.ljust(CELL) for tree in trees)).rstrip())
    print("configuration".ljust(CONFIGURATION)
          + f"{'req/s':>7} {'p50':>6} / {'p99 ms':<6} {'CPU us/req':>10}".ljust(CELL) * len(trees)
          + f"against {trees[0].label}")
    for rows in zip(*(closed[tree] for tree in trees)):
        print_side_by_side(f"{rows[0].procs} procs, {rows[0].concurrency} in flight", rows)
    for rows in zip(*(open_loop[tree] for tree in trees)):
        print_side_by_side(f"open, {rows[0].label}", rows)


def cpu_per_process(trees: list[Tree], closed: dict[Tree, list[Result]]) -> None:
    """Where the CPU of a request goes with 1, 2... brokers: each broker process's share of
    a core and its CPU per request it routed (the client sends each broker an equal share),
    and the workers' and clients' CPU per request; what it takes to project the capacity
    of N brokers on a machine with more cores."""
    print("\n=== CPU by process with each number of brokers: % of one core, and us of CPU "
          "per request it handled ===")
    print(f"{'configuration':<{CONFIGURATION}}{'brokers':>7} {'req/s':>8}  each broker "
          f"{'':>14}workers  clients  total us/req")
    for rows in zip(*(closed[tree] for tree in trees)):
        for tree, r in zip(trees, rows):
            def per_request(share: float, requests: float) -> float:
                return share / 100 * r.duration / requests * 1e6 if requests else 0.0
            brokers = "  ".join(
                f"{r.cpu[role]:3.0f}% {per_request(r.cpu[role], r.count / tree.brokers):3.0f}us"
                for role in broker_roles(tree.brokers))
            configuration = f"{r.procs} procs, {r.concurrency} in flight"
            print(f"{configuration:<{CONFIGURATION}}{tree.brokers:>7} {r.rps:>8,.0f}  "
                  f"{brokers:<25}{per_request(r.cpu['workers'], r.count):>6.0f}us "
                  f"{per_request(r.cpu['clients'], r.count):>6.0f}us "
                  f"{r.cpu_us_per_request:>8.0f}us")


def print_side_by_side(configuration: str, rows: tuple[Result, ...]) -> None:
    ours = rows[0]
    cells = []
    for r in rows:
        disturbed = " (!)" if r.errors or r.cpu.get("other", 0) > BUSY_LIMIT else ""
        cells.append(f"{r.rps:>7,.0f} {r.p50:6.2f} / {r.p99:<6.2f} {r.cpu_us_per_request:>10,.0f}"
                     f"{disturbed}".ljust(CELL))
    if ours.target_rate:  # the same rate for each: latency tells them apart
        against = [f"{r.p50 - ours.p50:+.2f} ms p50" for r in rows[1:]]
    else:
        against = [f"{r.rps / ours.rps:.2f}x req/s" if ours.rps else "-" for r in rows[1:]]
    print(configuration.ljust(CONFIGURATION) + "".join(cells) + ", ".join(against))


if __name__ == "__main__":
    sys.exit(main())
