"""What the scripts and the tests do with the processes they start: give them free
ports, start them in process groups that die with their parent, and stop them all.
The scripts import it as `children` (their directory is first on sys.path), the tests
as `scripts.children`."""

from __future__ import annotations

import os
import runpy
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable

# zroute_cli/processes.py, which zroute serve uses too, needs only the standard library. It is
# read by its path, not imported as part of zroute, so that a benchmark's child process
# may still import the project from another checkout (scripts/checkouts.py).
_PROCESSES = runpy.run_path(str(Path(__file__).resolve().parent.parent / "zroute_cli" / "processes.py"))
die_with_parent = _PROCESSES["die_with_parent"]
start_group = _PROCESSES["start_group"]


def free_port() -> int:
    """A TCP port that nothing listens on at 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_all(procs: Iterable[subprocess.Popen], timeout: float = 10.0) -> list[subprocess.Popen]:
    """SIGTERM every process that runs, all at once (one by one is slow: each drains);
    SIGKILL the process group of each still running `timeout` seconds later, and reap
    them all. Returns the ones that had to be killed."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = []
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed.append(proc)
    return killed
