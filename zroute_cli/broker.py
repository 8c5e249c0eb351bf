"""`zroute broker`: the broker, alone."""

from __future__ import annotations

import argparse
import json
import logging
import signal

from zroute.loader import LoadError
from broker.policies import Policy, is_policy_class, load_policies, unknown_policy
from zroute.protocol import DIRECT
from broker.server import Broker
from zroute_cli.command import (add_common_options, add_graph_options, component_main, load,
                                load_graph)
from zroute_cli.config import sections
from zroute.ports import tcp_address
from zroute.settings import BrokerSettings, Config
from zroute_cli.ports import check_free

log = logging.getLogger("zroute.broker")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run the broker: clients connect to one socket, workers to the other."
    parser.add_argument("--frontend", metavar="ADDR",
                        help=f"client-facing ZeroMQ endpoint (default: {BrokerSettings.frontend})")
    parser.add_argument("--backend", metavar="ADDR",
                        help=f"worker-facing ZeroMQ endpoint (default: {BrokerSettings.backend})")
    parser.add_argument("--policy", dest="policies", action="append", metavar="MODULE:CLASS",
                        help="a routing policy class that requests may name, besides the "
                             "built-in ones; repeatable (sets Broker.policies)")
    add_graph_options(parser, None)
    add_common_options(parser)
    parser.set_defaults(run=run, process_name="broker")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    config = load(args, overrides, {
        "Broker.frontend": args.frontend, "Broker.backend": args.backend,
        "Broker.policies": json.dumps(args.policies) if args.policies else None},
        None if args.graph is None else load_graph(args.graph, "--graph"))
    for endpoint in (config.broker.frontend, config.broker.backend):
        address = tcp_address(endpoint)
        if address is not None:
            check_free(*address)  # a taken port is then named with what holds it
    policies = configured_policies(config)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("endpoints: clients %s, workers %s", config.broker.frontend,
                  config.broker.backend)
        log.debug("policies: %s", ", ".join(f"{name} ({type(policy).__module__}."
                                            f"{type(policy).__qualname__})"
                                            for name, policy in policies.items()))
        log.debug("configuration: %s", json.dumps(config.as_dict()["Broker"]))
    broker = Broker(config.broker, policies=policies)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: broker.stop())
    broker.run()
    return 0


def configured_policies(config: Config) -> dict[str, Policy]:
    """The built-in policies, the classes of Broker.policies, and those that the services'
    routing_mode names (Frontend.routing_mode, say): the default policy of a gateway, or
    of a service's calls, must be valid here."""
    defaults = {f"{name}.routing_mode": settings.routing_mode
                for name, settings in sections(config).items()
                if getattr(settings, "routing_mode", "")}
    named = dict.fromkeys(config.broker.policies, "Broker.policies")
    for key, default in defaults.items():
        if is_policy_class(default):
            named.setdefault(default, key)
    policies = load_policies(named)
    for key, default in defaults.items():
        if default == DIRECT:
            raise LoadError(f"{key}: {DIRECT!r} needs a worker per request (?worker=), so "
                            f"it cannot be the default; use one of {', '.join(policies)}")
        if default not in policies:
            raise LoadError(f"{key}: {unknown_policy(default, policies)}")
    return policies


if __name__ == "__main__":  # how serve starts it: only this component is imported
    component_main("broker", configure)
