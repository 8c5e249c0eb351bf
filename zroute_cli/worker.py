"""`zroute worker`: one worker process, alone."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import secrets
import signal
from typing import Any

from zroute import protocol as p
from zroute.curve import peer_keys
from zroute.loader import load_object
from worker.runtime import Handler, Worker
from zroute_cli import aio
from zroute_cli.command import (add_common_options, broker_flags, component_main, load,
                                stop_requested)
from zroute.settings import BrokerSettings, Config
from zroute_cli.config import ConfigError

DEFAULT_HANDLER = "worker.greeting:make_handler"

log = logging.getLogger("zroute.worker")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run a worker that serves requests from the broker."
    parser.add_argument("--broker", metavar="ADDR", action="append",
                        help="a broker's worker-facing endpoint; repeat it for each broker, "
                             "the worker registers with every one (sets Broker.backends; "
                             f"default: Broker.backend, {BrokerSettings.backend})")
    parser.add_argument("--id", dest="worker_id", metavar="ID",
                        help="worker id (default: worker- and 6 random hex digits)")
    parser.add_argument("--handler", default=DEFAULT_HANDLER, metavar="MODULE:CALLABLE",
                        help="an async generator function, or a factory that takes the "
                             f"configuration and returns one (default: {DEFAULT_HANDLER})")
    parser.add_argument("--service", dest="services", action="append", metavar="NAME",
                        help="a service to serve with the handler; repeatable (default: generate)")
    parser.add_argument("--capacity", type=int, metavar="N",
                        help="most requests at once, 0 for unlimited "
                             "(default: Backend.ServiceArgs.capacity)")
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
    config = load(args, overrides, {"Backend.ServiceArgs.capacity": args.capacity,
                                    **broker_flags(args.broker, "Broker.backend")})
    handler = load_handler(args.handler, config)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("configuration: %s", json.dumps(config.as_dict()))
        log.debug("handler %s: %r", args.handler, handler)
    keys = peer_keys(config.backend.curve_key, "Backend.curve_key", config.broker)
    worker = Worker(
        config.backend, config.broker.for_workers(keys),
        args.worker_id or f"worker-{secrets.token_hex(3)}",  # tells clients nothing of the host
        {service: handler for service in args.services or ["generate"]})
    aio.run(_serve(worker))
    if worker.refused:
        flags = {p.E_ID_IN_USE: "--id: ", p.E_WRONG_ENDPOINT: "--broker: ",
                 p.E_AUTH_FAILED: "Backend.curve_key: "}
        raise ConfigError(f"{flags.get(worker.refused.code, '')}{worker.refused.message}")
    return 0


async def _serve(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, worker.stop)
    if not stop_requested():  # else it has nothing to drain: it never registered
        await worker.run()


if __name__ == "__main__":  # how serve starts it: only this component is imported
    component_main("worker", configure)
