"""What the scripts and the tests do with the processes they start: give them free
ports, and stop them all. The scripts import it as `children` (their directory is
first on sys.path), the tests as `scripts.children`. Start the processes with
zroute.processes.start_group, so that each has a process group to kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Iterable


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
