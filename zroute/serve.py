"""`zroute serve`: the whole stack, supervised.

It starts the broker, `Backend.ServiceArgs.workers` workers and
`Frontend.ServiceArgs.workers` gateways as child processes, waits until
/health is green, restarts any child that dies (with back-off), and on
Ctrl-C or SIGTERM stops them in order: gateways, then workers (which drain),
then the broker.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from zroute.command import add_common_options, load
from zroute.config import Config

READY_TIMEOUT_S = 30.0
RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0
STABLE_AFTER_S = 30.0  # a child that ran this long restarts with the shortest back-off
STOP_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run the broker, the workers and the HTTP gateway together, "
                          "and keep them running.")
    parser.add_argument("--port", type=int, help="HTTP port (default: Frontend.port, 8000)")
    add_common_options(parser)
    parser.set_defaults(run=run, process_name="serve")


def _die_with_parent() -> None:
    """In the child: get SIGTERM if `zroute serve` dies, so nothing is left behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: a clean shutdown still stops every child


@dataclass
class Child:
    name: str
    args: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = RESTART_MIN_S
    restart_at: float | None = None

    def start(self) -> None:
        # Own process group: a terminal's Ctrl-C reaches `serve` only, which stops
        # the children in order.
        self.process = subprocess.Popen(self.args, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        self.started = time.monotonic()
        self.restart_at = None

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()


@dataclass
class Supervisor:
    groups: list[list[Child]]  # started in this order, stopped in reverse

    @property
    def children(self) -> list[Child]:
        return [child for group in self.groups for child in group]

    def start(self) -> None:
        for child in self.children:
            child.start()

    def watch_once(self) -> None:
        """Restart children that exited, each after its own growing back-off."""
        now = time.monotonic()
        for child in self.children:
            code = child.exited()
            if code is None:
                continue
            if child.restart_at is None:
                if now - child.started >= STABLE_AFTER_S:
                    child.backoff = RESTART_MIN_S
                child.restart_at = now + child.backoff
                print(f"[serve] {child.name} exited with code {code}; restarting in "
                      f"{child.backoff:.1f} s", file=sys.stderr, flush=True)
                child.backoff = min(RESTART_MAX_S, child.backoff * 2)
            elif now >= child.restart_at:
                child.start()

    def stop(self) -> None:
        """Stop the groups in reverse order; SIGKILL what does not stop in time."""
        for group in reversed(self.groups):
            running = [c.process for c in group if c.process and c.process.poll() is None]
            for process in running:
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for process in running:
                try:
                    process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def child_args(command: str, name: str, args: argparse.Namespace, overrides: list[str],
               *extra: str) -> list[str]:
    """The command line of a child: the same config file, overrides and log options."""
    # `python -m broker` (or worker, gateway) loads only what that process needs.
    line = [sys.executable, "-m", command, "--log-name", name,
            "--log-level", args.log_level, "--log-format", args.log_format, *extra]
    if args.config:
        line += ["-f", args.config]
    return line + [f"--{override}" for override in overrides]


def build_supervisor(config: Config, args: argparse.Namespace, overrides: list[str]) -> Supervisor:
    port = str(config.frontend.port)
    broker = [Child("broker", child_args("broker", "broker", args, overrides))]
    workers = [Child(f"worker-{i}", child_args("worker", f"worker-{i}", args, overrides,
                                              "--id", f"worker-{i}"))
               for i in range(1, config.backend.service_args.workers + 1)]
    gateways = [Child(f"gateway-{i}", child_args("gateway", f"gateway-{i}", args, overrides,
                                                "--port", port))
                for i in range(1, config.frontend.service_args.workers + 1)]
    return Supervisor([broker, workers, gateways])


def health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.port is not None:  # the children get it as an override, like the rest
        overrides = [*overrides, f"Frontend.port={args.port}"]
    config = load(args, overrides)  # the broker checks Frontend.routing_mode: it knows the policies
    supervisor = build_supervisor(config, args, overrides)
    stop_requested = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: stop_requested.append(signum))
    supervisor.start()
    base = f"http://{config.frontend.host}:{config.frontend.port}"
    try:
        if not _wait_ready(supervisor, f"{base}/health", stop_requested):
            return 1 if not stop_requested else 0
        _announce(base, config)
        while not stop_requested:
            supervisor.watch_once()
            time.sleep(0.2)
        return 0
    finally:
        print("[serve] stopping: gateways, then workers, then the broker", file=sys.stderr,
              flush=True)
        supervisor.stop()


def _wait_ready(supervisor: Supervisor, url: str, stop_requested: list) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop_requested:
        status = health(url)
        if status and status.get("status") == "ok":
            return True
        for child in supervisor.children:
            code = child.exited()
            if code is not None:
                print(f"[serve] {child.name} exited with code {code} during start-up",
                      file=sys.stderr, flush=True)
                return False
        if time.monotonic() > deadline:
            print(f"[serve] {url} was not healthy within {READY_TIMEOUT_S:.0f} s",
                  file=sys.stderr, flush=True)
            return False
        time.sleep(0.1)
    return False


def _announce(base: str, config: Config) -> None:
    backend = config.backend
    print(f"\nzroute is serving on {base} ({backend.service_args.workers} worker(s), "
          f"greeting {backend.greeting!r}, routing {config.frontend.routing_mode})\n"
          f"Try:\n  curl -X POST {base}/generate -H 'Content-Type: application/json' "
          "-d '{\"text\": \"world,universe,galaxy\"}'\n"
          f"  curl {base}/stats\n", flush=True)
