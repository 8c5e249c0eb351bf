"""What every zroute command shares: config and logging options, and error handling."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Callable, Mapping, NoReturn, Sequence

import zmq

from zroute.curve import CurveError
from zroute.errors import StartFailed
from zroute.loader import LoadError, load_object
from zroute.services import Graph, GraphError, Service, walk
from zroute.settings import BrokerSettings, Config, GatewayChecks
from zroute_cli.config import (ConfigError, EndpointClash, builtin_graph, closest, closest_key,
                               load_config, section_of, split_overrides)
from zroute.logs import LOG_FORMATS, setup_logging

LOG_LEVELS = ("debug", "info", "warning", "error")
START_FAILED = 3  # the exit code of a process whose start-up code (an @on_start hook) raised

log = logging.getLogger("zroute")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--config", metavar="FILE",
                        help="YAML configuration file (default: built-in defaults)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text lines, or one JSON object per line")
    parser.add_argument("--log-name", metavar="NAME",
                        help="the name that prefixes this process's log lines")
    parser.add_argument("--check", action="store_true",
                        help="check the configuration (the file, the overrides and these "
                             "options) and exit: 0 if it is valid, else 2 and what is wrong; "
                             "starts nothing, and reads no file that the configuration names")
    # Set by `zroute serve` on its children: it runs as many of each as the config says.
    parser.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    # Errors name the subcommand, "zroute serve: error: ...", and show its usage.
    parser.set_defaults(prog=parser.prog, command_parser=parser)
    parser.epilog = ((parser.epilog or "") + " Any configuration key can be set with "
                     "--Section.key=value, e.g. --Backend.greeting=Hi.").strip()


def broker_flags(brokers: list[str] | None, key: str) -> dict[str, str | None]:
    """The overrides of a repeatable `--broker`, for `key` (Broker.frontend or
    Broker.backend): the list of every endpoint given (Broker.frontends, Broker.backends),
    and the first as the key itself, so that one given to the wrong side is named as
    such."""
    if not brokers:
        return {key: None}
    return {key: brokers[0], f"{key}s": json.dumps(brokers)}


def flag_overrides(flags: Mapping[str, object | None]) -> list[str]:
    """Command-line flags (`{"Broker.frontend": value}`) as overrides; None is no flag."""
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


def load(args: argparse.Namespace, overrides: Sequence[str],
         flags: Mapping[str, object | None] | None = None, graph: Graph | None = None,
         runs: Service | None = None) -> Config:
    """The configuration of `graph` (the built-in one's by default), with command-line
    flags (`{"Broker.frontend": value}`) on top. `runs` is the service this process runs
    one process of."""
    flags = flags or {}
    try:
        config = load_config(args.config, [*overrides, *flag_overrides(flags)], graph)
    except EndpointClash as clash:
        raise ConfigError(_clash_from_a_flag(args, flags) or str(clash)) from None
    if not args.supervised:
        _note_the_process_count(args, config, runs)
    if args.check:
        _stop_checked(args, config, runs or (graph or builtin_graph()).root)
    return config


class ConfigChecked(Exception):
    """--check: the configuration is valid, and the command goes no further."""


def _stop_checked(args: argparse.Namespace, config: Config, runs: Service) -> NoReturn:
    """--check: the first problem that would stop the command as it starts, else
    ConfigChecked. `runs` is the service it runs (for serve, the gateways')."""
    http = section_of(config, runs) if args.process_name in ("gateway", "serve") else None
    for problem in starting_problems(config, args.process_name, http):
        raise ConfigError(problem)
    if args.process_name in ("broker", "serve"):
        # Imported here: only these two load the routing policies, and the other
        # components' processes import none of the broker's code.
        from zroute_cli.broker import configured_policies
        configured_policies(config)  # a policy that does not load is a LoadError: exit 2
    raise ConfigChecked


def starting_problems(config: Config, process_name: str,
                      http: GatewayChecks | None) -> list[str]:
    """What stops the command `process_name` as it starts, though each value is valid
    alone: a broker beyond loopback without keys nor Broker.insecure, half of the TLS
    settings of the gateways' section `http`."""
    problems = [config.broker.exposure_problem() if process_name in ("broker", "serve") else None,
                http.tls_problem() if http is not None else None]
    return [problem for problem in problems if problem]


def _note_the_process_count(args: argparse.Namespace, config: Config,
                            runs: Service | None) -> None:
    """A count of processes for a service (or the brokers) means something to `zroute
    serve` only: say so rather than ignore it silently."""
    if runs is not None:
        key, count = f"{runs.name}.ServiceArgs.workers", section_of(config, runs).service_args.workers
    elif args.process_name == "broker":
        key, count = "Broker.ServiceArgs.workers", config.broker.service_args.workers
    else:
        return
    if count > 1:
        log.info("%s is %d, but %s runs one process; `zroute serve` runs %d",
                 key, count, args.prog, count)


def add_graph_options(parser: argparse.ArgumentParser, runs: str | None) -> None:
    """--graph, and for a command that runs a service (`runs`: "worker" or "gateway"),
    --service-class."""
    if runs is not None:
        parser.add_argument(
            "--service-class", metavar="FILE_OR_MODULE:Class",
            help=f"the service class whose {runs} to run (path/to/file.py:Class or "
                 "module:Class), with the services it depends on; with --graph, the name "
                 "of a service of that graph (default: the built-in greeting pipeline's "
                 f"{'Backend' if runs == 'worker' else 'Frontend'})")
    parser.add_argument(
        "--graph", metavar="FILE_OR_MODULE:Class",
        help="the service graph that the configuration configures, by its root class: the "
             "config file may hold a section for each of its services, and they are checked "
             "(zroute serve passes it to its processes; default: the graph of "
             f"{'--service-class' if runs else 'the built-in greeting pipeline'})")


def load_graph(spec: str | None, what: str) -> Graph:
    """The graph of the class that `spec` names (FILE_OR_MODULE:Class), checked; the
    built-in one without a spec."""
    if spec is None:
        return builtin_graph()
    try:
        return walk(load_object(spec, what))
    except GraphError as e:
        raise ConfigError(f"{what} {spec!r}: {e}") from None


def service_to_run(args: argparse.Namespace, http: bool) -> tuple[Graph, Service]:
    """The graph of --graph and --service-class, and the service of it this process runs:
    one with @api routes for a gateway (`http`), with endpoints for a worker."""
    if args.graph is not None:
        graph = load_graph(args.graph, "--graph")
        try:
            described = (graph.service(args.service_class) if args.service_class
                         else graph.root if http else None)
        except GraphError as e:
            raise ConfigError(f"--service-class: {e}") from None
        if described is None:
            raise ConfigError("--graph needs --service-class NAME: the service of the graph "
                              "to run")
    else:
        graph = load_graph(args.service_class, "--service-class")
        described = graph.root if args.service_class else (
            graph.root if http else graph.service("Backend"))
    if described.is_http != http:
        kind = ("has no @api routes: a gateway serves a class with routes, and `zroute "
                "worker --service-class` runs one with endpoints" if http else
                "has @api routes: the gateway serves it (`zroute gateway --service-class`); "
                "a worker runs a class with endpoints")
        raise ConfigError(f"--service-class: {described.name} {kind}")
    return graph, described


# The broker's two endpoints, and who uses each.
ENDPOINT_ROLES = {"Broker.frontend": "client", "Broker.backend": "worker"}


def _clash_from_a_flag(args: argparse.Namespace, flags: Mapping[str, object | None]) -> str | None:
    """When one flag set an endpoint to the other one's, what the user did and what is
    right: '--broker X is the broker's client endpoint (Broker.frontend); ...'."""
    given = {key: value for key, value in flags.items()
             if key in ENDPOINT_ROLES and value is not None}
    if len(given) != 1:
        return None  # both or neither: the configuration's own message says it
    [(key, value)] = given.items()
    [other] = set(ENDPOINT_ROLES) - {key}
    flag = _flag_of(args, value)
    if flag is None:
        return None
    default = getattr(BrokerSettings, key.partition(".")[2])
    role, other_role = ENDPOINT_ROLES[key], ENDPOINT_ROLES[other]
    if flag == "--broker":  # a component that connects to the broker
        return (f"--broker {value} is the broker's {other_role} endpoint ({other}); "
                f"{args.prog} connects to its {role} endpoint, {key} (default {default})")
    return (f"{flag} {value} is already the broker's {other_role} endpoint ({other}): "
            f"its {role} endpoint, {key}, needs one of its own (default {default})")


def _flag_of(args: argparse.Namespace, value: object) -> str | None:
    """The option that gave `value`: '--broker', '--backend'...; None if none did."""
    dest = next((dest for dest, given in vars(args).items()
                 if given is value or (isinstance(given, list) and value in given)), None)
    return None if dest is None else "--" + dest.replace("_", "-")


def unknown_argument(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """What is wrong with the first argument `parser` does not know (of `unknown`, the
    ones it left), and what would be right."""
    arg = unknown[0]
    if not arg.startswith("-"):
        hint = parser.get_default("positional_hint") or f"see {parser.prog} --help"
        return f"unexpected argument {arg!r}: {parser.prog} takes options only; {hint}"
    name, has_value, value = arg.partition("=")
    if "." in name:  # a configuration key, mistyped or without its value
        key = closest_key(name.lstrip("-"))
        if not has_value:
            following = unknown[1] if len(unknown) > 1 and not unknown[1].startswith("-") else None
            example = f"--{key or 'Section.key'}={following or 'VALUE'}"
            return f"override {arg!r} has no value: the form is {example}"
        if key:
            return f"unrecognized argument {arg!r}: did you mean --{key}={value}?"
        return (f"unrecognized argument {arg!r}: no such configuration key "
                "(the form is --Section.key=value, e.g. --Backend.greeting=Hi)")
    # argparse lists its options only in _actions; hidden ones are not suggested.
    option = closest(name, [o for action in parser._actions for o in action.option_strings
                            if action.help != argparse.SUPPRESS])
    hint = f"did you mean {option}?" if option else f"see {parser.prog} --help"
    return f"unrecognized argument {arg!r}: {hint}"


class StopBeforeServing(BaseException):
    """SIGTERM before the command has set its own way to stop: there is nothing to drain
    yet. (A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the
    way, around a user's module say, takes it for an error.)"""


_stop_requested = False  # a SIGTERM came while an event loop ran, before its handler


def _stop_before_serving(signum: int, frame: object) -> None:
    """Raise StopBeforeServing, except inside a running event loop, which would take the
    exception for a failed callback and go on: there the SIGTERM is remembered, and the
    component asks for it with stop_requested() once it has set its own handler."""
    global _stop_requested
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise StopBeforeServing from None
    _stop_requested = True


def stop_requested() -> bool:
    """Whether a SIGTERM came before the running event loop had its own handler for it."""
    return _stop_requested


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, set up logging, run `args.run(args, overrides)`.

    A configuration error (or a module:attr that does not load, a key file that cannot
    be used) is one line on stderr and exit code 2.
    """
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        args.command_parser.error(unknown_argument(args.command_parser, unknown))
    setup_logging(args.log_name or getattr(args, "worker_id", None) or args.process_name,
                  args.log_level, args.log_format)
    # Until the command installs its own handler (a component, once it is ready to drain),
    # SIGTERM ends it with exit code 0, as it would a moment later, not with the signal.
    signal.signal(signal.SIGTERM, _stop_before_serving)
    try:
        return args.run(args, overrides)
    except StopBeforeServing:
        log.info("stopped before serving")
        return 0
    except ConfigChecked:
        print(f"{args.prog}: the configuration is valid")
        return 0
    except (ConfigError, LoadError, CurveError) as e:
        print(f"{args.prog}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `zroute stats --json | head`: the reader has had enough
        sys.stderr.close()  # nothing more can be written, and Python must not try at exit
        return 0
    except (zmq.ZMQError, OSError) as e:  # an address that cannot be bound or connected
        print(f"{args.prog}: error: {e}", file=sys.stderr)
        return 1
    except StartFailed as e:  # the user's start-up code: serve stops, and restarts none
        print(f"{args.prog}: error: {e}", file=sys.stderr)
        return START_FAILED
    except KeyboardInterrupt:
        return 130


def component_main(name: str, configure: Callable[[argparse.ArgumentParser], None]) -> NoReturn:
    """Run one component's subcommand alone, as `zroute serve` starts its children
    (`python -m zroute_cli.broker`): without importing the other components."""
    parser = argparse.ArgumentParser(prog=f"zroute {name}")
    configure(parser)
    sys.exit(run_command(parser, None))
