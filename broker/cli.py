"""`zroute broker` (also `python -m broker`)."""

from __future__ import annotations

import argparse
import signal
from typing import Sequence

from broker.server import Broker
from zroute.command import add_common_options, load, run_command


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run the broker: clients connect to one socket, workers to the other."
    parser.add_argument("--frontend", metavar="ADDR",
                        help="client-facing ZeroMQ endpoint (default: tcp://127.0.0.1:5555)")
    parser.add_argument("--backend", metavar="ADDR",
                        help="worker-facing ZeroMQ endpoint (default: tcp://127.0.0.1:5556)")
    add_common_options(parser)
    parser.set_defaults(run=run, process_name="broker")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    config = load(args, overrides, {"Broker.frontend": args.frontend,
                                    "Broker.backend": args.backend})
    broker = Broker(config.broker)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: broker.stop())
    broker.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker")
    configure(parser)
    return run_command(parser, argv)
