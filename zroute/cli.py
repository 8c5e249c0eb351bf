"""The `zroute` command: one entry point, a subcommand per component."""

from __future__ import annotations

import argparse
from typing import Sequence

import broker.cli
import worker.cli
from zroute import stats_cli
from zroute.command import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zroute", description="A streaming load balancer on ZeroMQ.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, summary in (
        ("broker", broker.cli, "run the broker"),
        ("worker", worker.cli, "run a worker"),
        ("stats", stats_cli, "show the broker's stats"),
    ):
        module.configure(commands.add_parser(name, help=summary))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
