"""Real processes for tests: free ports, start components as a user would, wait on conditions."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

from scripts.children import free_port, start_group, stop_all
from zroute.client import BlockingClient, BrokerError
from zroute.curve import PeerKeys


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


def unused_path(directory: Path, stem: str, suffix: str) -> Path:
    """directory/stem+suffix, or with -2, -3, ... after `stem` if that exists."""
    path, n = directory / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}{suffix}"
    return path


def ending_problem(name: str, code: int, log: str, expected_exit: int | None = 0,
                   traceback_expected: bool = False, killed_by_stop: bool = False) -> str | None:
    """What is wrong with how the process `name` ended, and the end of its log; None if it
    ended as expected: with `expected_exit` (None: any), and a traceback in its log only
    if `traceback_expected`."""
    problems = []
    if expected_exit is not None and code != expected_exit:
        problems.append(f"exited with code {code}, not {expected_exit}")
    if killed_by_stop:
        problems.append("was killed: it had not exited after SIGTERM")
    if not traceback_expected and "Traceback (most recent call last)" in log:
        problems.append("logged a traceback")
    if not problems:
        return None
    return f"{name} {' and '.join(problems)}; its log ends:\n{log[-3000:]}"


def check_ending(name: str, code: int, log: str) -> None:
    """Fail unless the process `name` exited with 0 and no traceback in its log."""
    problem = ending_problem(name, code, log)
    if problem:
        raise AssertionError(problem)


class Proc:
    """A child process whose output goes to a log file.

    It is to end with exit code 0 and no traceback in its log: stop() and wait() fail
    the test otherwise, naming it, its exit code and the end of its log. A test that
    ends it another way on purpose says so first, with expect() or kill().
    """

    def __init__(self, name: str, args: list[str], log_dir: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = unused_path(log_dir, name, ".log")  # a restarted name has a log of its own
        self._log = open(self.log_path, "wb")
        self.popen = start_group(args, stdout=self._log, stderr=subprocess.STDOUT,
                                 env=env or child_env(), cwd=cwd)
        self.expected_exit: int | None = 0
        self.traceback_expected = False
        self.killed_by_stop = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def expect(self, exit_code: int | None, *, traceback: bool = False) -> None:
        """How the test means this process to end: with `exit_code` (None: any, which the
        test checks itself), and with a traceback in its log if `traceback`."""
        self.expected_exit = exit_code
        self.traceback_expected = traceback

    def kill(self) -> None:
        """SIGKILL, on purpose: the process is to end with exit code -9."""
        self.expect(-signal.SIGKILL, traceback=self.traceback_expected)
        self.signal(signal.SIGKILL)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait until the process exits by itself; fail unless it ended as expected."""
        self.popen.wait(timeout)
        self.ended(killed_by_stop=False)
        check_ended([self])
        return self.popen.returncode

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, and SIGKILL for its process group after `timeout` seconds; fail
        unless it ended as expected."""
        stop_procs([self], timeout)
        return self.popen.returncode

    def ended(self, killed_by_stop: bool) -> None:
        """Once it has exited: `killed_by_stop` if SIGTERM was not enough."""
        self.killed_by_stop |= killed_by_stop
        self._log.close()

    def problem(self) -> str | None:
        """What is wrong with how the process ended; None if it ended as expected (or
        runs)."""
        code = self.popen.poll()
        if code is None:
            return None
        return ending_problem(self.name, code, self.output(), self.expected_exit,
                              self.traceback_expected, self.killed_by_stop)

    def output(self) -> str:
        if not self._log.closed:  # ended() closes it
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


def stop_procs(procs: list[Proc], timeout: float = 10.0) -> None:
    """SIGTERM them all at once (one by one is slow: each drains), and SIGKILL the
    process group of those still running after `timeout` seconds; fail naming each one
    that did not end as expected."""
    killed = stop_all([proc.popen for proc in procs], timeout)
    for proc in procs:
        proc.ended(killed_by_stop=proc.popen in killed)
    check_ended(procs)


def check_ended(procs: list[Proc]) -> None:
    problems = [problem for proc in procs if (problem := proc.problem())]
    if problems:
        raise AssertionError("\n\n".join(problems))


class Stack:
    """A broker and workers on free ports, started with the `zroute` command."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.backend = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[Proc] = []
        self.cwd: Path | None = None  # where processes start: a user's project directory
        self.client_keys: PeerKeys | None = None  # what stats() connects with: a CURVE broker's
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
            self._stats_client = BlockingClient(self.frontend, curve=self.client_keys)
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
        """Stop every process, all at once; fail if one did not end as expected (see
        Proc), naming each such process."""
        if self._stats_client is not None:
            self._stats_client.close()
        procs = list(reversed(self.procs))  # SIGTERM reaches the last started first
        try:
            stop_procs(procs)
        finally:
            for proc in procs:
                print(f"----- {proc.name} (exit {proc.popen.returncode})\n"
                      f"{proc.output()[-3000:]}")


def returned_types(decode: typing.Callable) -> set[type]:
    """The message types a decoder of zroute.protocol says it returns."""
    return set(typing.get_args(typing.get_type_hints(decode)["return"]))
