"""Real processes for tests: free ports, start components as a user would, wait on conditions."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from zroute.client import BlockingClient, BrokerError

ZROUTE = str(Path(sys.executable).with_name("zroute"))
REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def child_env() -> dict[str, str]:
    """The environment for child processes: the repository root on PYTHONPATH,
    so that `--handler tests.handlers:NAME` imports."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_zroute(*args: str, timeout: float = 20.0,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a `zroute` command to its end; its stdout and stderr are captured as text."""
    return subprocess.run([ZROUTE, *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env(), cwd=cwd)


def readme_example(heading: str) -> str:
    """The first Python block of the README's section `heading` (e.g. "### Handlers")."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index(f"\n{heading}\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def workers_by_id(stats: dict) -> dict[str, dict]:
    return {w["id"]: w for w in stats["workers"]}


def all_idle(stats: dict) -> bool:
    """Nothing in flight on the broker or any worker."""
    return stats["broker"]["inflight"] == 0 and all(w["inflight"] == 0 for w in stats["workers"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def async_wait_until(condition: Callable[[], Any], timeout: float = 10.0,
                           what: str = "condition") -> Any:
    """wait_until for a running event loop: `condition` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


class Proc:
    """A child process whose output goes to a log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True, env=env or child_env(), cwd=cwd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def output(self) -> str:
        if not self._log.closed:  # stop() closes it
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class Stack:
    """A broker and workers on free ports, started with the `zroute` command."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[Proc] = []
        self.cwd: Path | None = None  # where processes start: a user's project directory
        self._stats_client: BlockingClient | None = None

    def start(self, name: str, *args: str) -> Proc:
        proc = Proc(name, [ZROUTE, *args], self.log_dir, self.cwd)
        self.procs.append(proc)
        return proc

    def broker(self, *args: str) -> Proc:
        return self.start("broker", "broker", "--frontend", self.frontend,
                          "--backend", self.backend, *args)

    def worker(self, worker_id: str, *args: str, sleep_time: float = 0) -> Proc:
        return self.start(worker_id, "worker", "--broker", self.backend, "--id", worker_id,
                          f"--Backend.sleep_time={sleep_time}", *args)

    def stats(self) -> dict:
        if self._stats_client is None:
            self._stats_client = BlockingClient(self.frontend)
        return self._stats_client.stats(timeout=5)

    def ready_workers(self) -> list[str]:
        try:
            workers = self.stats()["workers"]
        except BrokerError:
            return []
        return sorted(w["id"] for w in workers if w["state"] == "ready")

    def wait_stats(self, condition: Callable[[dict], Any], timeout: float = 10.0,
                   what: str = "stats condition") -> dict:
        """Poll the broker's stats until `condition(stats)` is true; return those stats."""
        def check() -> dict | None:
            stats = self.stats()
            return stats if condition(stats) else None
        return wait_until(check, timeout, what)

    def wait_workers(self, *ids: str, timeout: float = 10.0) -> None:
        wait_until(lambda: set(ids) <= set(self.ready_workers()), timeout,
                   f"workers {ids} to register")

    def close(self) -> None:
        if self._stats_client is not None:
            self._stats_client.close()
        for proc in reversed(self.procs):  # all at once: stopping them one by one is slow
            if proc.alive:
                proc.signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            proc.stop()
            print(f"----- {proc.name} (exit {proc.popen.returncode})\n{proc.output()[-3000:]}")
