"""`zroute worker`: one worker process, alone: of a service class (the built-in Backend by
default), or of a plain handler."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import secrets
import signal
from typing import Any

from zroute import protocol as p
from zroute.client import Client
from zroute.curve import peer_keys
from zroute.loader import load_object
from zroute.services import Instance
from worker.runtime import Handler, Worker
from worker.service import ServiceWorker
from zroute_cli import aio
from zroute_cli.command import (add_common_options, add_graph_options, broker_flags,
                                component_main, load, service_to_run, stop_requested)
from zroute.settings import BrokerSettings, Config
from zroute_cli.config import ConfigError, builtin_graph, section_of

log = logging.getLogger("zroute.worker")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run a worker that serves requests from the broker: the endpoints "
                          "of a service class (--service-class; the built-in greeting "
                          "Backend by default), or a plain handler (--handler).")
    parser.add_argument("--broker", metavar="ADDR", action="append",
                        help="a broker's worker-facing endpoint; repeat it for each broker, "
                             "the worker registers with every one (sets Broker.backends; "
                             f"default: Broker.backend, {BrokerSettings.backend})")
    parser.add_argument("--id", dest="worker_id", metavar="ID",
                        help="worker id (default: the --service-class's name, e.g. Middle, "
                             "a dash and 6 random hex digits; worker- and 6 random hex "
                             "digits for the built-in Backend and --handler)")
    parser.add_argument("--handler", metavar="MODULE:CALLABLE",
                        help="serve a plain handler rather than a service class: an async "
                             "generator function, or a factory that takes the configuration "
                             "and returns one")
    parser.add_argument("--service", dest="services", action="append", metavar="NAME",
                        help="a service to serve with --handler, or with the built-in "
                             "greeting; repeatable (default: generate)")
    add_graph_options(parser, "worker")
    parser.add_argument("--key", metavar="FILE",
                        help="this worker's CURVE key pair, for brokers with CURVE (NAME."
                             "key_secret from `zroute keys worker NAME`; sets the curve_key "
                             "of its service's section, e.g. Backend.curve_key)")
    parser.add_argument("--capacity", type=int, metavar="N",
                        help="most requests at once, 0 for unlimited "
                             "(default: the service section's ServiceArgs.capacity, e.g. "
                             "Backend.ServiceArgs.capacity)")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="a file that exists while a broker has this worker registered, "
                             "and names those that have (for a readiness probe: test -e "
                             "PATH); removed when it stops")
    add_common_options(parser)
    parser.set_defaults(run=run, process_name="worker")


HANDLER_FORMS = ("a handler is an async generator function (async def with yield); "
                 "a factory takes the configuration and returns one")


def load_handler(spec: str, config: Config) -> Handler:
    """Load `module:callable`; call it with the config unless it is the handler itself."""
    target: Any = load_object(spec, "--handler")
    if inspect.isasyncgenfunction(target):
        return target
    if not callable(target):
        raise ConfigError(f"--handler {spec!r} is {_what_it_is(target)}, not callable: "
                          f"{HANDLER_FORMS}")
    problem = _almost_a_handler(target)
    if problem:
        raise ConfigError(f"--handler {spec!r} is {problem}")
    try:
        handler = target(config)
    except Exception as e:
        raise ConfigError(f"--handler {spec!r} is {_what_it_is(target)}, and called as a "
                          f"factory it raised {type(e).__name__}: {e}; {HANDLER_FORMS}") from None
    if not callable(handler):
        raise ConfigError(f"--handler {spec!r} is {_what_it_is(target)}, and called as a "
                          f"factory it returned {_what_it_is(handler)}; {HANDLER_FORMS}")
    problem = _almost_a_handler(handler)
    if problem:
        raise ConfigError(f"--handler {spec!r} returned {problem}")
    return handler


def _what_it_is(thing: Any) -> str:
    """What a user's object is, for error messages: 'a plain function (def without
    yield)', "the str 'x\\n'"..."""
    if inspect.isfunction(thing):
        return "a plain function (def without yield)"
    if inspect.isclass(thing):
        return f"the class {thing.__name__}"
    text = repr(thing)
    return f"the {type(thing).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _almost_a_handler(function: Any) -> str | None:
    """What a function that looks like a handler but is not one is: neither it nor a
    factory can be called like this, so say it before the first request fails."""
    if inspect.isgeneratorfunction(function):
        kind = "a generator function (def with yield)"
    elif inspect.iscoroutinefunction(function):
        kind = "an async function without yield"
    else:
        return None
    return f"{kind}: {HANDLER_FORMS}"


def _check_names(args: argparse.Namespace) -> None:
    named = [("--service", service) for service in args.services or []]
    if args.worker_id is not None:
        named.append(("--id", args.worker_id))
    for flag, name in named:
        problem = p.name_problem(name)
        if problem:
            raise ConfigError(f"{flag} {name!r} {problem}: give a name of printable characters, "
                              f"at most {p.MAX_ID_LENGTH} bytes (e.g. {flag} "
                              f"{'generate' if flag == '--service' else 'worker-1'})")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    _check_names(args)
    if args.handler is not None or (args.services and args.service_class is None):
        runner: Worker | ServiceWorker = _handler_worker(args, overrides)
        worker, curve_setting = runner, "Backend.curve_key"
    else:
        runner = _service_worker(args, overrides)
        worker, curve_setting = runner.worker, f"{runner.instance.service.name}.curve_key"
    ready_file = ReadyFile(args.ready_file) if args.ready_file else None
    if ready_file:
        worker.on_registered = ready_file.set
    try:
        aio.run(_serve(runner))
    finally:
        if ready_file:
            ready_file.set([])
    if worker.refused:
        flags = {p.E_ID_IN_USE: "--id: ", p.E_WRONG_ENDPOINT: "--broker: ",
                 p.E_AUTH_FAILED: f"{curve_setting}: "}
        raise ConfigError(f"{flags.get(worker.refused.code, '')}{worker.refused.message}")
    return 0


def _worker_id(args: argparse.Namespace, service_name: str) -> str:
    """--id, else the name of the --service-class's service (`worker` for the built-in
    Backend and a handler, as it always was), a dash and random hex digits, which tell
    nothing of the host."""
    if args.worker_id:
        return args.worker_id
    return f"{service_name if args.service_class else 'worker'}-{secrets.token_hex(3)}"


def _flags(args: argparse.Namespace, service_name: str) -> dict[str, object | None]:
    """The keys that the options set, for a worker of the service `service_name`."""
    return {f"{service_name}.ServiceArgs.capacity": args.capacity,
            f"{service_name}.curve_key": args.key,
            **broker_flags(args.broker, "Broker.backend")}


def _handler_worker(args: argparse.Namespace, overrides: list[str]) -> Worker:
    """A worker of a plain handler (the built-in greeting's, without --handler) under the
    names of --service, with the built-in graph's configuration (a factory may read
    `config.backend.greeting`)."""
    if args.service_class is not None or args.graph is not None:
        raise ConfigError("--handler serves a plain handler: it takes no --service-class "
                          "or --graph")
    config = load(args, overrides, _flags(args, "Backend"))
    if args.handler is None:
        backend = Instance(builtin_graph().service("Backend"), config.backend).bind(None)
        handler = backend.function("generate")
    else:
        handler = load_handler(args.handler, config)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("configuration: %s", json.dumps(config.as_dict()))
        log.debug("handler %s: %r", args.handler, handler)
    keys = peer_keys(config.backend.curve_key, "Backend.curve_key", config.broker)
    return Worker(config.backend, config.broker.for_workers(keys), _worker_id(args, "Backend"),
                  {service: handler for service in args.services or ["generate"]})


def _service_worker(args: argparse.Namespace, overrides: list[str]) -> ServiceWorker:
    """A worker of a service class: its endpoints, its hooks, and a broker client for its
    dependencies, which connects with the worker's own key."""
    if args.services:
        raise ConfigError("--service names the services of a --handler; a service class's "
                          "endpoints name themselves (@endpoint(name=...))")
    graph, described = service_to_run(args, http=False)
    name = described.name
    own_id = _worker_id(args, name)
    config = load(args, overrides, _flags(args, name), graph, runs=described)
    settings = section_of(config, described)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("configuration: %s", json.dumps(config.as_dict()))
    keys = peer_keys(settings.curve_key, f"{name}.curve_key", config.broker)
    client = None
    if described.dependencies:
        link = config.broker.for_clients(keys)
        client = Client(link.endpoints, timeout=config.broker.request_timeout,
                        timeout_setting="Broker.request_timeout",
                        heartbeat_interval=link.heartbeat_interval,
                        heartbeat_misses=link.heartbeat_misses, name=own_id, curve=link.curve,
                        max_message_size=link.max_message_size)
    instance = Instance(described, settings).bind(client)
    worker = Worker(settings, config.broker.for_workers(keys), own_id, instance.handlers())
    return ServiceWorker(instance, worker, client)


class ReadyFile:
    """--ready-file: a file that exists while a broker has the worker registered, and
    holds the endpoints of those that have, one a line."""

    def __init__(self, path: str) -> None:
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise ConfigError(f"--ready-file {path!r}: the directory {directory!r} does not exist")
        self.path = path
        self.set([])  # one left by a process before this one says nothing of this one

    def set(self, brokers: list[str]) -> None:
        try:
            if brokers:  # whole or not at all, for whoever reads it meanwhile
                with open(f"{self.path}.new", "w") as new:
                    new.write("".join(f"{broker}\n" for broker in brokers))
                os.replace(f"{self.path}.new", self.path)
            else:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("--ready-file %s: %s", self.path, e.strerror or e)


async def _serve(runner: Worker | ServiceWorker) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, runner.stop)
    if not stop_requested():  # else it has nothing to drain: it never registered
        await runner.run()


if __name__ == "__main__":  # how serve starts it: only this component is imported
    component_main("worker", configure)
