"""`zroute gateway`: the HTTP frontend, serving the @api routes of a service class (the
built-in Frontend's /generate by default)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import signal
import ssl
import sys

from aiohttp import web

from gateway.app import Gateway
from gateway.routes import Call, Forward, Route
from zroute.curve import peer_keys
from zroute.services import Instance
from zroute.settings import FrontendSettings
from zroute_cli import aio
from zroute_cli.command import (add_common_options, add_graph_options, broker_flags,
                                component_main, load, service_to_run, stop_requested)
from zroute_cli.config import ConfigError, section_of
from zroute_cli.ports import PortInUse, http_url, in_use_message

log = logging.getLogger("zroute.gateway")

# After the drain, cut streams still take this long to write their last line.
CUT_GRACE_S = 5.0
# Descriptors kept free of HTTP connections when Frontend.max_connections is 0: the
# broker's socket and ZeroMQ's own, logs, the listening sockets, with room to spare.
RESERVED_DESCRIPTORS = 64
# ...and at most this many connections then, whatever the limit: each costs memory too.
MAX_DEFAULT_CONNECTIONS = 10_000


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run the HTTP gateway: the @api routes of a service class "
                          "(--service-class; the built-in Frontend's POST /generate by "
                          "default), GET /health, /stats, /stats/stream, /metrics, /dashboard.")
    parser.add_argument("--broker", metavar="ADDR", action="append",
                        help="a broker's client-facing endpoint; repeat it for each broker "
                             "(sets Broker.frontends; default: Broker.frontend)")
    parser.add_argument("--host", help="address to listen on (default: Frontend.host)")
    parser.add_argument("--port", type=int,
                        help=f"HTTP port (default: Frontend.port, {FrontendSettings.port})")
    # For `zroute serve` only: its gateways share one port. Any other gateway has the
    # port to itself, so that two stacks never answer on one port.
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--key", metavar="FILE",
                        help="this gateway's CURVE key pair, for brokers with CURVE (NAME."
                             "key_secret from `zroute keys client NAME`; sets the curve_key "
                             "of the section of the class it serves, e.g. Frontend.curve_key)")
    add_graph_options(parser, "gateway")
    add_common_options(parser)
    parser.set_defaults(run=run, process_name="gateway")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    graph, described = service_to_run(args, http=True)
    name = described.name
    config = load(args, overrides, {**broker_flags(args.broker, "Broker.frontend"),
                                    f"{name}.host": args.host, f"{name}.port": args.port,
                                    f"{name}.curve_key": args.key},
                  graph, runs=described)
    settings = section_of(config, described)
    frontend = dataclasses.replace(
        settings, max_connections=connection_limit(settings.max_connections))
    tls = tls_context(frontend)
    keys = peer_keys(frontend.curve_key, f"{name}.curve_key", config.broker)
    instance = Instance(described, frontend)
    try:
        gateway = Gateway(frontend, config.broker.for_clients(keys), args.log_name or "",
                          routes=routes_of(instance), on_start=instance.start,
                          on_stop=instance.stop)
    except ValueError as e:  # a route on one of the gateway's own paths, say
        raise ConfigError(f"{name}: {e}") from None
    instance.bind(gateway.client)  # its dependencies call through the gateway's client
    aio.run(serve(gateway, frontend.host, frontend.port, frontend.drain_timeout,
                  args.reuse_port, tls))
    return 0


def routes_of(instance: Instance) -> dict[str, list[Route]]:
    """The service's @api routes as the gateway serves them, by path: a method called in
    the gateway, or a forward() passed to a dependency's endpoint at the broker."""
    described = instance.service
    routes: dict[str, list[Route]] = {}
    for route in described.routes.values():
        if route.forward is None:
            served: Route = Call(instance.function(route.attribute), route.method)
        else:
            attribute, endpoint = route.forward
            target = described.dependencies[attribute].endpoints[endpoint].name
            served = Forward(target, route.method)
        routes.setdefault(route.path, []).append(served)
    return routes


def tls_context(frontend: FrontendSettings) -> ssl.SSLContext | None:
    """The server side of HTTPS, from Frontend.tls_cert and Frontend.tls_key; None for
    plain HTTP."""
    problem = frontend.tls_problem()
    if problem:
        raise ConfigError(problem)
    if not frontend.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(frontend.tls_cert, frontend.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"Frontend.tls_cert {frontend.tls_cert!r} and Frontend.tls_key "
                          f"{frontend.tls_key!r} cannot be used: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    return context


def connection_limit(configured: int) -> int:
    """Frontend.max_connections as the gateway takes it, a number: its 0 is the open-file
    limit (raised first, in any case) less what the process needs besides."""
    descriptors = raise_descriptor_limit()
    return configured or max(1, min(descriptors - RESERVED_DESCRIPTORS, MAX_DEFAULT_CONNECTIONS))


def raise_descriptor_limit() -> int:
    """Raise this process's open-file limit to its hard limit, and return it: every HTTP
    connection holds a descriptor, and the usual soft limit (1,024) would make accept()
    fail for everyone long before Frontend.max_connections is reached."""
    if sys.platform == "win32":
        return MAX_DEFAULT_CONNECTIONS + RESERVED_DESCRIPTORS
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_DEFAULT_CONNECTIONS + RESERVED_DESCRIPTORS
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft


async def serve(gateway: Gateway, host: str, port: int, drain_timeout: float,
                reuse_port: bool = False, tls: ssl.SSLContext | None = None) -> None:
    """Serve until SIGINT or SIGTERM; then stop accepting, let the requests in flight
    finish for up to `drain_timeout` seconds (a second signal: none), and cut the rest
    with an error line. With Frontend.admin_port, the operators' endpoints are served
    there. With `tls`, both listeners serve HTTPS only. The gateway's on_start runs
    before it listens, its on_stop after its listeners closed (StartFailed, from the
    former, ends it before it listens: run_command's one line and exit code 3)."""
    await gateway.start()
    settings = gateway.settings
    listeners = [(gateway.server(), host, port)]
    if gateway.admin_routes:
        listeners.append((gateway.server(gateway.admin_routes), settings.admin_host,
                          settings.admin_port))
    runners = []
    loop = asyncio.get_running_loop()
    cut = None
    try:
        for server, listen_host, listen_port in listeners:
            runner = web.ServerRunner(server, shutdown_timeout=drain_timeout + CUT_GRACE_S)
            runners.append(runner)
            await runner.setup()
            await listen(runner, listen_host, listen_port, reuse_port, tls)
        secure = tls is not None
        admin = (f", operators' endpoints on "
                 f"{http_url(settings.admin_host, settings.admin_port, secure)}"
                 if gateway.admin_routes else "")
        log.info("gateway listening on %s%s, brokers %s, at most %d connections",
                 http_url(host, port, secure), admin, ", ".join(gateway.broker.endpoints),
                 settings.max_connections)
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():  # the second one: no more waiting
                gateway.cut_streams()
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        if stop_requested():
            on_signal()
        await stop.wait()
        log.info("gateway stopping: %d request(s) in flight; waiting up to %g s "
                 "(Ctrl-C again to cut them now)", gateway.metrics.inflight, drain_timeout)
        gateway.feed.close()  # a feed never ends by itself: nothing to wait for
        cut = loop.call_later(drain_timeout, gateway.cut_streams)
    finally:
        # Each stops accepting, then waits for its requests in flight.
        await asyncio.gather(*(runner.cleanup() for runner in runners))
        if cut is not None:
            cut.cancel()
        await gateway.stop()


async def listen(runner: web.ServerRunner, host: str, port: int, reuse_port: bool,
                 tls: ssl.SSLContext | None) -> None:
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port, ssl_context=tls).start()
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(in_use_message(port)) from None
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


if __name__ == "__main__":  # how serve starts it: only this component is imported
    component_main("gateway", configure)
