"""The `zroute` command: one entry point, a subcommand per component."""

from __future__ import annotations

import argparse
from importlib.metadata import version
from typing import Sequence

import zroute_cli.broker
import zroute_cli.gateway
import zroute_cli.worker
from zroute_cli import keys, serve, stats as stats_cli
from zroute_cli.command import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zroute", description="A streaming load balancer on ZeroMQ.")
    parser.add_argument("--version", action="version", version=f"zroute {version('zroute')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, summary in (
        ("serve", serve, "run the whole stack: broker, workers and gateway"),
        ("broker", zroute_cli.broker, "run the broker"),
        ("worker", zroute_cli.worker, "run a worker"),
        ("gateway", zroute_cli.gateway, "run the HTTP gateway"),
        ("stats", stats_cli, "show the broker's stats"),
        ("keys", keys, "create CURVE keys for the broker, workers and clients"),
    ):
        module.configure(commands.add_parser(name, help=summary))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
