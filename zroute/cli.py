"""The `zroute` command: one entry point, a subcommand per component."""

from __future__ import annotations

import argparse
from importlib.metadata import version
from typing import Sequence

import broker.cli
import gateway.cli
import worker.cli
from zroute import serve, stats_cli
from zroute.command import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zroute", description="A streaming load balancer on ZeroMQ.")
    parser.add_argument("--version", action="version", version=f"zroute {version('zroute')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, summary in (
        ("serve", serve, "run the whole stack: broker, workers and gateway"),
        ("broker", broker.cli, "run the broker"),
        ("worker", worker.cli, "run a worker"),
        ("gateway", gateway.cli, "run the HTTP gateway"),
        ("stats", stats_cli, "show the broker's stats"),
    ):
        module.configure(commands.add_parser(name, help=summary))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
