"""Checkouts of zroute whose code a benchmark runs side by side (--compare-tree): this
one, and others, such as a `git worktree` of another commit.

Each process imports the project from one checkout only. Another checkout's layout may
differ from this one's (before 9a5e4a9 the shared modules lived in broker/ and the
command in zroute/cli.py), and nothing of this checkout may fill its gaps: its
directory goes first on sys.path, and the finder of this checkout's editable install
(pip install -e), which would find this checkout's modules where it has none, goes.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
# The project's top-level packages.
PROJECT_PACKAGES = ("zroute", "broker", "worker", "gateway", "zroute_cli")
# The Python client: broker/client.py until the shared modules moved to zroute/ (9a5e4a9).
CLIENT_MODULES = ("zroute.client", "broker.client")
# The module of the finder that an editable install of zroute adds to sys.meta_path.
EDITABLE_FINDER = "__editable___zroute_"
# `python -c RUN_COMMAND TREE MODULE FUNCTION ARGS...` runs the zroute command of TREE.
BENCH_WORKER, BENCH_CLIENT = "bench-worker", "bench-client"  # the names of the CURVE keys
RUN_COMMAND = (f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); "
               "import checkouts; checkouts.run_zroute_command()")


def git_commit(path: Path) -> str:
    """The short commit checked out at `path`; "" if git cannot say."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, text=True,
                              capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


@dataclass(frozen=True)
class Tree:
    """A checkout whose code a benchmark runs: this one, or another commit's."""

    path: Path
    name: str  # "" for this checkout; else its commit, or its folder's name
    keys: Path | None = None  # the CURVE keys its processes use (`zroute keys`); None: none
    brokers: int = 1  # the brokers its stack runs, each worker and client on all of them

    @classmethod
    def at(cls, path: Path) -> Tree:
        path = path.resolve()
        return cls(path, "" if path == ROOT else git_commit(path) or path.name)

    @property
    def label(self) -> str:
        """What a benchmark calls its zroute: zroute, or zroute@<name> for another; and
        +curve with CURVE, x2brokers with two brokers."""
        return ((f"zroute@{self.name}" if self.name else "zroute") + ("+curve" if self.keys else "")
                + (f"x{self.brokers}brokers" if self.brokers > 1 else ""))

    def with_curve(self, directory: Path) -> Tree:
        """This checkout with CURVE on every socket: a broker key, one key for all its
        workers and one for all its clients, made in `directory` by its `zroute keys`."""
        for command in (("init",), ("worker", BENCH_WORKER), ("client", BENCH_CLIENT)):
            subprocess.run([*self.command(), "keys", *command, "--dir", str(directory)],
                           check=True, capture_output=True, cwd=self.path)
        return dataclasses.replace(self, keys=directory)

    def with_brokers(self, count: int) -> Tree:
        """This checkout with `count` brokers."""
        return dataclasses.replace(self, brokers=count)

    def curve_args(self, role: str) -> list[str]:
        """What the `zroute` command of a role ("broker", "worker" or "client", a gateway
        or `zroute stats`) adds for CURVE; nothing without it."""
        if self.keys is None:
            return []
        if role == "broker":
            return [f"--Broker.curve_secret_key={self.keys}/broker.key_secret"]
        setting, name = (("Backend.curve_key", BENCH_WORKER) if role == "worker"
                         else ("Frontend.curve_key", BENCH_CLIENT))
        return [f"--{setting}={self.keys}/{name}.key_secret",
                f"--Broker.curve_public_key={self.keys}/broker.key"]

    def command(self) -> list[str]:
        """The `zroute` command, running this checkout's code: the entry point its
        pyproject.toml names."""
        pyproject = (self.path / "pyproject.toml").read_text()
        entry = re.search(r'^zroute\s*=\s*"([\w.]+):(\w+)"', pyproject, re.MULTILINE)
        if entry is None:
            raise SystemExit(f"{self.path}/pyproject.toml names no `zroute` command")
        return [sys.executable, "-c", RUN_COMMAND, str(self.path), *entry.groups()]


def import_from(tree: str) -> None:
    """Make this process import the project from the checkout `tree` only. Call it
    before any of the project is imported."""
    loaded = [name for name in PROJECT_PACKAGES if name in sys.modules]
    if loaded:
        raise RuntimeError(f"{', '.join(loaded)} imported before the checkout {tree} was chosen")
    sys.meta_path[:] = [finder for finder in sys.meta_path
                        if not getattr(finder, "__module__", "").startswith(EDITABLE_FINDER)]
    sys.path.insert(0, tree)


def run_zroute_command() -> None:
    """RUN_COMMAND: the zroute command of a checkout, in a process of its own."""
    tree, module, function = sys.argv[1:4]
    sys.argv[:4] = ["zroute"]
    import_from(tree)
    sys.exit(getattr(importlib.import_module(module), function)())


def client_module() -> ModuleType:
    """The checkout's module of the Python client (BlockingClient, Client, BrokerError)."""
    for name in CLIENT_MODULES:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    raise RuntimeError(f"the checkout has none of {', '.join(CLIENT_MODULES)}")


def client_options(keys: str) -> dict[str, Any]:
    """The Python client's options for CURVE with the keys of Tree.with_curve in `keys`
    (none for ""), in a process that imports the project from its checkout already."""
    if not keys:
        return {}
    from zroute.curve import PeerKeys

    return {"curve": PeerKeys.load(f"{keys}/{BENCH_CLIENT}.key_secret", f"{keys}/broker.key")}
