"""`zroute stats`: the broker's stats as a table, as JSON, or live."""

from __future__ import annotations

import argparse
import sys
import time

import orjson

from zroute import protocol as p
from zroute.client import BlockingClient, BrokerError
from zroute.curve import peer_keys
from zroute_cli.command import (add_common_options, add_graph_options, broker_flags, load,
                                load_graph)
from zroute_cli.config import ConfigError, section_of

NO_BROKER_HINT = (": is a broker running? `zroute serve` starts the whole stack, "
                  "`zroute broker` a broker alone")
CLEAR_SCREEN = "\033[H\033[2J"
REFRESH_S = 1.0
COLUMNS = ("WORKER", "SERVICES", "STATE", "INFLIGHT", "CAPACITY", "COMPLETED", "FAILED", "P50",
           "P99", "SEEN")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Show the brokers' stats: one row per worker, then each broker's "
                          "totals and theirs.")
    parser.add_argument("--broker", metavar="ADDR", action="append",
                        help="a broker's client-facing endpoint; repeat it for each broker "
                             "(sets Broker.frontends; default: Broker.frontend)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    output.add_argument("--watch", action="store_true",
                        help="refresh the table every second, until Ctrl-C; a broker that "
                             "does not answer is shown as such, and waited for")
    parser.add_argument("--key", metavar="FILE",
                        help="this client's CURVE key pair, for a broker with CURVE (NAME."
                             "key_secret from `zroute keys client NAME`; default: "
                             "the curve_key of the graph's root, e.g. Frontend.curve_key)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="how long to wait for the broker (default: 5; with --watch, "
                             "at most a second)")
    add_graph_options(parser, None)
    add_common_options(parser)
    parser.set_defaults(run=run, process_name="stats")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if not args.timeout > 0:  # nan too
        raise ConfigError(f"--timeout {args.timeout:g} is invalid: must be a number of "
                          "seconds > 0")
    graph = load_graph(args.graph, "--graph")
    if not graph.root.is_http:
        raise ConfigError(f"--graph: {graph.root.name} has no @api routes: name the root of "
                          "the graph, whose section holds the gateway's curve_key")
    key_setting = f"{graph.root.name}.curve_key"
    config = load(args, overrides, {**broker_flags(args.broker, "Broker.frontend"),
                                    key_setting: args.key}, graph)
    keys = peer_keys(section_of(config, graph.root).curve_key,
                     "--key" if args.key else key_setting, config.broker)
    broker = config.broker.for_clients(keys)
    with BlockingClient(broker.endpoints, heartbeat_interval=broker.heartbeat_interval,
                        heartbeat_misses=broker.heartbeat_misses, curve=broker.curve) as client:
        if args.watch:
            return watch(client, min(args.timeout, REFRESH_S))
        try:
            stats = client.stats(args.timeout)
        except BrokerError as e:
            hint = NO_BROKER_HINT if e.code == p.E_BROKER_UNREACHABLE else ""
            print(f"zroute stats: error: {e.message}{hint}", file=sys.stderr)
            return 1
        print(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode()
              if args.json else render(stats))
        return 0


def watch(client: BlockingClient, timeout: float) -> int:
    """Redraw the table every second until Ctrl-C; through a broker that is down, too."""
    try:
        while True:
            began = time.monotonic()
            try:
                screen = render(client.stats(timeout))
            except BrokerError as e:
                screen = (e.message if e.code == p.E_AUTH_FAILED
                          else f"broker unreachable at {client.address}") + " (retrying)"
            print(CLEAR_SCREEN + screen, flush=True)
            time.sleep(max(0.0, REFRESH_S - (time.monotonic() - began)))
    except KeyboardInterrupt:
        return 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}ms"


def render(stats: dict) -> str:
    """A fixed-width table of the workers, then the broker's totals."""
    rows = [COLUMNS]
    for w in stats["workers"]:
        rows.append((w["id"], ",".join(w["services"]), w["state"], str(w["inflight"]),
                     str(w["capacity"] or "unlimited"), str(w["completed"]),
                     str(w["failed"]), _seconds(w["latency_p50_s"]),
                     _seconds(w["latency_p99_s"]), f"{w['last_seen_s']:.1f}s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    if len(rows) == 1:
        lines.append("(no workers)")
    lines.append("")
    brokers = stats["brokers"]
    if len(brokers) > 1:  # each broker's line, then their totals
        lines.extend(f"{broker['endpoint']}: {_counts(broker)}" if broker["reachable"]
                     else f"{broker['endpoint']}: unreachable ({broker['error']})"
                     for broker in brokers)
        lines.append(f"total: {_counts(stats['broker'])}")
    else:
        lines.append(f"broker: {_counts(stats['broker'])}")
    return "\n".join(lines)


def _counts(b: dict) -> str:
    """A broker's totals on one line."""
    return (f"up {b['uptime_s']:.0f}s  requests {b['requests']}  "
            f"inflight {b['inflight']}  waiting {b['queue_depth']}  "
            f"completed {b['completed']}  failed {b['failed']}  chunks {b['chunks']}  "
            f"retries {b['retries']}  refusals {b['refusals']}  timeouts {b['timeouts']}  "
            f"evictions {b['evictions']}  refused keys {b['auth_failures']}")
