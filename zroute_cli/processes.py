"""Child processes that leave nothing behind: each in its own process group, and told
to stop when the process that started it dies."""

from __future__ import annotations

import ctypes
import signal
import subprocess
from typing import Any, Callable, Sequence

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child: get SIGTERM when its parent dies, even by SIGKILL (Linux; elsewhere
    only a parent that stops its children on the way out leaves none behind)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux


def start_group(args: Sequence[str], *, before_exec: Callable[[], None] | None = None,
                **popen_options: Any) -> subprocess.Popen:
    """Start `args` in a process group of its own (a terminal's Ctrl-C reaches only the
    parent, which stops its children in order; os.killpg(pid) ends the child and all it
    started), and have it die with its parent. `before_exec` runs in the child as well."""
    def prepare() -> None:
        die_with_parent()
        if before_exec is not None:
            before_exec()

    return subprocess.Popen(args, start_new_session=True, preexec_fn=prepare, **popen_options)
