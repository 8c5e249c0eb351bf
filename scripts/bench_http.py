#!/usr/bin/env python3
"""HTTP benchmark: zroute against nginx round robin over aiohttp servers, side by side.

    .venv/bin/python scripts/bench_http.py [--duration 5] [--rounds 3] [--connections 32 256]
                                           [--gateways 1 2] [--profile SECONDS] [--curve]

The targets, each fed the seed request {"text": "world,universe,galaxy"} by wrk:
  zroute     wrk -> gateway -> broker -> 2 workers (sleep_time 0)
  zroute-2gw the same with two gateway processes sharing the port
             (Frontend.ServiceArgs.workers: 2), one per CPU here
  nginx      wrk -> nginx (1 worker process, round robin, keepalive upstreams,
             proxy_buffering off) -> 2 minimal aiohttp servers streaming the same lines
  aiohttp    wrk -> one such aiohttp server alone (a reference, no balancer)
The targets take turns (zroute, nginx, aiohttp, zroute, ...) so that drift on the
machine hits all of them. For each it prints requests/s, p50 and p99 latency, and the
zroute/nginx ratios, with the CPU time each process spent per request. Then it measures
time to first byte with sleep_time 0.1 through zroute and through nginx. With
--profile it then runs py-spy (installed from PyPI if missing) on each process of the
first zroute target under load, and prints how busy each is and where its time goes.
--compare-tree runs the zroute targets of other checkouts too (before and after a
change, in one run), and --curve this checkout's again with CURVE on every ZeroMQ socket
(zroute+curve).

It installs wrk and nginx-light from Debian's packages when they are missing, and skips
what it cannot install. Every process it starts listens on loopback and is stopped at
the end. All processes log at warning level: access logs are off on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from checkouts import ROOT, Tree
from children import free_port, start_group, stop_all

HERE = Path(__file__).resolve().parent
BODY = '{"text": "world,universe,galaxy"}'
EXPECTED = b"Hello world!\nHello universe!\nHello galaxy!\n"
WRK_SCRIPT = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""
NGINX_CONF = """worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream backends {{
        server 127.0.0.1:{b1};
        server 127.0.0.1:{b2};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def ensure_tools() -> dict[str, bool]:
    """wrk and nginx from Debian's packages, installed if missing."""
    wanted = {"wrk": "wrk", "nginx": "nginx-light"}
    missing = [pkg for tool, pkg in wanted.items() if not shutil.which(tool)]
    if missing and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return {tool: shutil.which(tool) is not None for tool in wanted}


@dataclass
class Target:
    name: str
    url: str
    pids: dict[str, int] = field(default_factory=dict)  # role -> pid, for CPU accounting


class Processes:
    """Every child process, stopped together."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []

    def start(self, *args: str, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        child = start_group(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=cwd, env=env)
        self.children.append(child)
        return child

    def stop(self) -> None:
        stop_all(self.children)


def wait_http(url: str, timeout: float = 30, expected: bytes = EXPECTED) -> None:
    """Wait until a POST of the seed request to `url` answers `expected`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, data=BODY.encode(), method="POST")
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.read() == expected:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench_http: {url} did not answer within {timeout} s")


def start_zroute(procs: Processes, sleep_time: float, gateways: int, tree: Tree,
                 workers: int = 2) -> Target:
    """A zroute stack that runs the code of the checkout `tree`."""
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    port = free_port()
    command = tree.command()

    def start(*args: str) -> int:
        return procs.start(*command, *args, "--log-level", "warning", cwd=tree.path).pid

    pids = {"broker": start("broker", "--frontend", frontend, "--backend", backend,
                            *tree.curve_args("broker"))}
    for i in range(1, workers + 1):
        pids[f"worker-{i}"] = start("worker", "--broker", backend, "--id", f"worker-{i}",
                                    f"--Backend.sleep_time={sleep_time}",
                                    *tree.curve_args("worker"))
    for i in range(1, gateways + 1):
        pids[f"gateway-{i}"] = start("gateway", "--broker", frontend, "--port", str(port),
                                     *tree.curve_args("client"))
    name = tree.label.replace("zroute", "zroute" if gateways == 1 else f"zroute-{gateways}gw", 1)
    target = Target(name, f"http://127.0.0.1:{port}/generate", pids)
    wait_http(target.url)
    return target


def start_plain(procs: Processes, sleep_time: float) -> tuple[int, int]:
    port = free_port()
    pid = procs.start(sys.executable, str(HERE / "plain_http_server.py"), str(port),
                      str(sleep_time)).pid
    wait_http(f"http://127.0.0.1:{port}/generate")
    return port, pid


def start_nginx(procs: Processes, workdir: Path, sleep_time: float) -> Target:
    (b1, pid1), (b2, pid2) = start_plain(procs, sleep_time), start_plain(procs, sleep_time)
    port = free_port()
    conf = workdir / f"nginx-{port}.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, b1=b1, b2=b2, port=port))
    nginx = procs.start("nginx", "-c", str(conf), "-g", "daemon off;")
    target = Target("nginx", f"http://127.0.0.1:{port}/generate",
                    {"nginx": nginx.pid, "backend-1": pid1, "backend-2": pid2})
    wait_http(target.url)
    return target


def cpu_ticks(pid: int) -> int:
    """User and system time of a process, its threads and its children (nginx's
    worker is a child of its master), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(fields[11]) + int(fields[12]) + sum(cpu_ticks(int(c)) for c in children)


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: dict[str, float]  # role -> CPU microseconds per request


def to_ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if match is None:
        raise SystemExit(f"bench_http: cannot read wrk's latency {value!r}")
    number, unit = match.groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def run_wrk(target: Target, connections: int, duration: float, script: Path) -> Result:
    before = {role: cpu_ticks(pid) for role, pid in target.pids.items()}
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
                          "-s", str(script), target.url],
                         capture_output=True, text=True).stdout
    after = {role: cpu_ticks(pid) for role, pid in target.pids.items()}
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write"
                                            r"|timeout) (\d+)", out))
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    return Result(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        p50_ms=to_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
        p99_ms=to_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
        errors=errors,
        cpu_us={role: (after[role] - before[role]) * tick_us / max(requests, 1)
                for role in target.pids},
    )


async def time_to_first_byte(url: str, requests: int, concurrency: int) -> list[float]:
    import aiohttp

    samples: list[float] = []
    async with aiohttp.ClientSession() as session:
        async def one() -> None:
            started = time.perf_counter()
            async with session.post(url, data=BODY) as response:
                await response.content.readany()
                samples.append(time.perf_counter() - started)
                await response.read()

        for _ in range(requests // concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def throughput(args: argparse.Namespace, targets: list[Target],
               script: Path) -> dict[int, dict[str, list[Result]]]:
    """wrk against each target at each of args.connections, taking turns, with a table
    of medians per connection count; every result, by connections and target name."""
    every: dict[int, dict[str, list[Result]]] = {}
    for connections in args.connections:
        results: dict[str, list[Result]] = {t.name: [] for t in targets}
        every[connections] = results
        for round_no in range(1, args.rounds + 1):
            for target in targets:  # taking turns: drift hits every target alike
                result = run_wrk(target, connections, args.duration, script)
                results[target.name].append(result)
                print(f"  c={connections} round {round_no} {target.name:<18} "
                      f"{result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                      f"p99 {result.p99_ms:6.2f} ms  errors {result.errors}", flush=True)
        print(f"\nwrk -t1 -c{connections}, {args.rounds} rounds of {args.duration:g} s, medians:")
        print(f"  {'target':<18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}   CPU us per request")
        summary = {}
        for name, runs in results.items():
            summary[name] = (median([r.rps for r in runs]), median([r.p50_ms for r in runs]),
                             median([r.p99_ms for r in runs]))
            cpu = "  ".join(f"{role} {median([r.cpu_us[role] for r in runs]):.0f}"
                            for role in runs[0].cpu_us)
            cpu += f"  total {median([sum(r.cpu_us.values()) for r in runs]):.0f}"
            print(f"  {name:<18} {summary[name][0]:8.0f} {summary[name][1]:8.2f} "
                  f"{summary[name][2]:8.2f}   {cpu}")
        if "nginx" in summary:
            ng = summary["nginx"]
            for name in (n for n in summary if n.startswith("zroute")):
                zr = summary[name]
                print(f"  {name}/nginx: req/s {zr[0] / ng[0]:.2f}x (target >= 1.0), "
                      f"p99 {zr[2] / ng[2]:.2f}x (target <= 1.5)")
        print()
    return every


def ttfb(args: argparse.Namespace, procs: Processes, workdir: Path, have_nginx: bool) -> None:
    """Time to first byte with a 0.1 s delay before each line. The server alone, with
    the same delay and the same timer overshoot, is the worker's own time; what a
    balancer adds is its p50 minus that one's."""
    delay = 0.1
    port, pid = start_plain(procs, delay)
    targets = [Target("aiohttp", f"http://127.0.0.1:{port}/generate", {"server": pid}),
               start_zroute(procs, delay, 1, Tree.at(ROOT))]
    if have_nginx:
        targets.append(start_nginx(procs, workdir, delay))
    print(f"time to first byte, sleep_time {delay} s, {args.ttfb_requests} requests, "
          f"{args.ttfb_concurrency} at a time, p50:")
    alone = None
    for target in targets:
        samples = asyncio.run(time_to_first_byte(target.url, args.ttfb_requests,
                                                 args.ttfb_concurrency))
        p50 = median(samples) * 1000
        alone = alone or p50
        added = "" if target.name == "aiohttp" else f"  adds {p50 - alone:.2f} ms"
        target_note = "  (target <= 1 ms)" if target.name == "zroute" else ""
        print(f"  {target.name:<8} {p50:7.2f} ms{added}{target_note}")


PROFILE_RATE = 200  # py-spy samples per second; it records only samples of a busy thread


def profile(target: Target, connections: int, seconds: float, script: Path,
            workdir: Path) -> None:
    """py-spy on every process of `target` while wrk loads it: where each one's
    samples fall, by function (own time, then time including callees)."""
    py_spy = ensure_py_spy()
    if py_spy is None:
        print("bench_http: py-spy is not installed and could not be; no profile")
        return
    wrk = subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{seconds + 2:g}s", "-s",
                            str(script), target.url], stdout=subprocess.DEVNULL)
    outputs = {role: workdir / f"{role}-{connections}.txt" for role in target.pids}
    spies = [subprocess.Popen([py_spy, "record", "--nonblocking", "-r", str(PROFILE_RATE),
                               "-f", "raw",
                               "-d", f"{seconds:g}", "-p", str(pid), "-o", str(outputs[role])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for role, pid in target.pids.items()]
    for spy in spies:
        spy.wait()
    wrk.wait()
    print(f"\nprofile of {target.name} at {connections} connections, {seconds:g} s "
          "(share of each process's samples):")
    for role, path in outputs.items():
        own, total, samples = profile_shares(path)
        busy = 100 * samples / (PROFILE_RATE * seconds)
        print(f"  {role}: {samples} samples, busy {busy:.0f}% of the time")
        for (name, share), (name2, share2) in zip(own, total):
            print(f"    own {share:5.1f}% {name:<44} with callees {share2:5.1f}% {name2}")


def profile_shares(path: Path, top: int = 8) -> tuple[list, list, int]:
    """py-spy's raw output (one 'frame;frame;... count' line per stack) as the top
    functions by own samples and by samples including their callees."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        samples += int(count)
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in set(frames[1:]):  # the module frame is in every stack
            total[frame] = total.get(frame, 0) + int(count)

    def shares(counts: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [(name[:44], 100 * n / max(samples, 1)) for name, n in ranked]

    # Frames in (nearly) every stack are the way down to the event loop: no news.
    most = max(total.values(), default=0)
    total = {name: n for name, n in total.items() if n < 0.9 * most}
    return shares(own), shares(total), samples


def ensure_py_spy() -> str | None:
    """py-spy from PyPI into this Python's environment, if missing."""
    path = Path(sys.executable).with_name("py-spy")
    if not path.exists():
        print("installing py-spy ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"],
                       capture_output=True)
    return str(path) if path.exists() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="turns per target")
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--gateways", type=int, nargs="+", default=[1, 2],
                        help="zroute gateway processes: one zroute target per number")
    parser.add_argument("--curve", action="store_true",
                        help="also run this checkout's zroute targets with CURVE between the "
                             "gateway, the broker and the workers (zroute+curve)")
    parser.add_argument("--compare-tree", type=Path, nargs="+", default=[], metavar="DIR",
                        help="also run the zroute targets from these checkouts (another "
                             "commit's worktree, say), taking turns with the others")
    parser.add_argument("--profile", type=float, metavar="SECONDS", default=0,
                        help="then run py-spy on each zroute process under load for this long "
                             "and print where each spends its time")
    parser.add_argument("--ttfb-requests", type=int, default=200)
    parser.add_argument("--ttfb-concurrency", type=int, default=4)
    args = parser.parse_args()

    tools = ensure_tools()
    if not tools["wrk"]:
        print("bench_http: wrk is not installed and could not be; nothing to measure")
        return 1
    if not tools["nginx"]:
        print("bench_http: nginx is not installed and could not be; skipping the baseline")
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="zroute-bench-") as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text(WRK_SCRIPT)
        try:
            trees = [Tree.at(ROOT), *map(Tree.at, args.compare_tree)]
            if args.curve:
                trees.insert(1, trees[0].with_curve(workdir / "keys"))
            targets = [start_zroute(procs, 0.0, n, tree) for tree in trees for n in args.gateways]
            if tools["nginx"]:
                targets.append(start_nginx(procs, workdir, 0.0))
            port, pid = start_plain(procs, 0.0)
            targets.append(Target("aiohttp", f"http://127.0.0.1:{port}/generate",
                                  {"server": pid}))
            throughput(args, targets, script)
            ttfb(args, procs, workdir, tools["nginx"])
            if args.profile:
                for connections in args.connections:
                    profile(targets[0], connections, args.profile, script, workdir)
        finally:
            procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
