#!/usr/bin/env python3
"""The cost of a pipeline stage, side by side in one run.

    .venv/bin/python scripts/bench_stages.py [--duration 4] [--rounds 3]
                                             [--connections 1 32] [--profile SECONDS]

Three targets, each fed the seed request {"text": "world,universe,galaxy"} by wrk, with
sleep_time 0 and one process per service:
  direct      wrk -> gateway -> broker -> the built-in Backend worker: the gateway's
              /generate passed to a worker, as zroute serves without a graph
  2 stages    wrk -> gateway running examples/simple_pipeline.py's Frontend (a Call
              route) -> broker -> its Backend worker
  3 stages    wrk -> gateway running examples/multistage_pipeline.py's Frontend ->
              broker -> its Middle worker -> broker -> its Backend worker
The targets take turns (scripts/bench_http.py's rounds), each with a broker of its own,
and print requests/s, p50, p99 and the CPU time each process spent per request. Then
what the middle stage adds (3 stages less 2 stages: CPU per request summed over the
processes, and p50) against what a direct call costs whole. --profile runs py-spy on
each process of the 3-stage target under load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench_http import (WRK_SCRIPT, Processes, Result, Target, ensure_tools, profile,
                        start_zroute, throughput, wait_http)
from checkouts import ROOT, Tree
from children import free_port

STAGES = {  # target name -> (graph, its worker services, what it answers the seed request)
    "2 stages": ("examples/simple_pipeline.py:Frontend", ["Backend"],
                 b"Hello world!\nHello universe!\nHello galaxy!\n"),
    "3 stages": ("examples/multistage_pipeline.py:Frontend", ["Backend", "Middle"],
                 b"1. Hello world!\n2. Hello universe!\n3. Hello galaxy!\n"),
}


def start_graph(procs: Processes, name: str, tree: Tree) -> Target:
    """A broker, one worker per service of the graph, and a gateway serving its root."""
    graph, services, expected = STAGES[name]
    frontend, backend = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    port = free_port()

    def start(*args: str) -> int:  # Middle calls Backend through the broker's frontend
        return procs.start(*tree.command(), *args, "--Backend.sleep_time=0",
                           f"--Broker.frontend={frontend}", "--log-level", "warning",
                           cwd=tree.path).pid

    pids = {"broker": start("broker", "--frontend", frontend, "--backend", backend)}
    for service in services:
        pids[service] = start("worker", "--graph", graph, "--service-class", service,
                              "--broker", backend, "--id", f"{service}-1")
    pids["gateway"] = start("gateway", "--service-class", graph, "--port", str(port))
    target = Target(name, f"http://127.0.0.1:{port}/generate", pids)
    wait_http(target.url, expected=expected)
    return target


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_total(runs: list[Result]) -> float:
    return median([sum(r.cpu_us.values()) for r in runs])


def cpu_by_role(runs: list[Result]) -> dict[str, float]:
    return {role: median([r.cpu_us[role] for r in runs]) for role in runs[0].cpu_us}


def middle_stage(connections: int, results: dict[str, list[Result]]) -> None:
    """What the middle stage adds (3 stages less 2) against a direct call's whole cost."""
    direct, two, three = results["direct"], results["2 stages"], results["3 stages"]
    added_cpu = cpu_total(three) - cpu_total(two)
    added_p50 = median([r.p50_ms for r in three]) - median([r.p50_ms for r in two])
    direct_cpu, direct_p50 = cpu_total(direct), median([r.p50_ms for r in direct])
    two_roles, three_roles = cpu_by_role(two), cpu_by_role(three)
    where = "  ".join(f"{role} {three_roles[role] - two_roles.get(role, 0):+.0f}"
                      for role in three_roles)
    print(f"wrk -c{connections}: the middle stage adds {added_cpu:.0f} us CPU per request "
          f"({where}) and {added_p50:+.2f} ms p50;")
    print(f"  a direct call costs {direct_cpu:.0f} us CPU per request and {direct_p50:.2f} ms "
          "p50 whole")
    for what, added, whole in (("CPU per request", added_cpu, direct_cpu),
                               ("p50", added_p50, direct_p50)):
        verdict = "PASS" if added < whole else "MISS"
        print(f"  {verdict}  the middle stage's {what} is {added / whole:.2f}x a direct "
              "call's (target < 1)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="turns per target")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--profile", type=float, metavar="SECONDS", default=0,
                        help="then run py-spy on each process of the 3-stage target under "
                             "load for this long")
    args = parser.parse_args()
    if not ensure_tools()["wrk"]:
        print("bench_stages: wrk is not installed and could not be; nothing to measure")
        return 1
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.2f}")
    procs = Processes()
    tree = Tree.at(ROOT)
    with tempfile.TemporaryDirectory(prefix="zroute-bench-") as tmp:
        workdir = Path(tmp)
        script = workdir / "post.lua"
        script.write_text(WRK_SCRIPT)
        try:
            direct = start_zroute(procs, 0.0, 1, tree, workers=1)
            direct.name = "direct"
            targets = [direct, *(start_graph(procs, name, tree) for name in STAGES)]
            results = throughput(args, targets, script)
            for connections, by_target in results.items():
                middle_stage(connections, by_target)
            print(f"load average at the end: {os.getloadavg()[0]:.2f}")
            if args.profile:
                for connections in args.connections:
                    profile(targets[-1], connections, args.profile, script, workdir)
        finally:
            procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
