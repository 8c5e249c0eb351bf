"""`zroute serve [FILE_OR_MODULE:Class]`: a service graph, supervised (without one, the
built-in greeting pipeline: Frontend and Backend, worker/greeting.py).

It walks the graph from the class given, then starts `Broker.ServiceArgs.workers`
brokers (1), `ServiceArgs.workers` workers for each service with endpoints (`Backend-1`,
`Backend-2`...) and the root's `ServiceArgs.workers` gateways as child processes, waits
until every service has a worker and /health is green, restarts any child that dies
(with back-off), and on Ctrl-C or SIGTERM stops them in order: gateways, then each
service's workers, those that call the others first (all drain), then the brokers; a
second Ctrl-C stops them all at once.

Before it starts anything it checks that the ports it needs are free, so that a
second stack on the same machine stops with one line rather than sharing them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from zroute_cli.broker import configured_policies
from zroute_cli.command import (START_FAILED, add_common_options, flag_overrides, load,
                                load_graph, starting_problems)
from zroute.services import START, Graph, Route, Service
from zroute.settings import Config, FrontendSettings
from zroute_cli.config import ConfigError, builtin_graph, section_of
from zroute.ports import Address, same_listener, tcp_address
from zroute_cli.processes import start_group
from zroute_cli.ports import (PortInUse, check_free, free_port_from, held_by_running_zroute,
                              is_free, local_url, mark_stopping, unresolvable)

log = logging.getLogger("zroute_cli.serve")

READY_TIMEOUT_S = 30.0
RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0
STABLE_AFTER_S = 30.0  # a child that ran this long restarts with the shortest back-off
# A child that exits with an error this soon after its first start failed on its settings
# or its address, and would fail the same way again: serve stops rather than restart it.
START_FAILURE_S = 5.0
STOP_MARGIN_S = 10.0  # a child has its drain timeout and this much more to exit
HURRY_S = 1.0  # in a hurry, a child has this long after a second SIGTERM before SIGKILL
POLL_S = 0.05


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run a service graph: the broker (or Broker.ServiceArgs.workers "
                          "brokers), the workers of each service and the HTTP gateway of its "
                          "root, together, and keep them running.")
    parser.add_argument("graph", nargs="?", metavar="FILE_OR_MODULE:Class",
                        help="the root of the graph, a class with @api routes, as "
                             "path/to/file.py:Class or module:Class; the services it "
                             "depends on are started too (default: the built-in greeting "
                             "pipeline, worker/greeting.py)")
    parser.add_argument("--host", help="address to listen on (default: the root's host, "
                                       f"e.g. Frontend.host, {FrontendSettings.host})")
    parser.add_argument("--port", type=int, help="HTTP port (default: the root's port, e.g. "
                                                 f"Frontend.port, {FrontendSettings.port})")
    add_common_options(parser)
    parser.epilog += (" The config file has a section per service of the graph, named by "
                      "its class, and Broker.")
    parser.set_defaults(run=run, process_name="serve")


@dataclass
class Child:
    name: str
    args: list[str]
    ports: list[Address]  # the ports it listens on
    stop_timeout: float  # how long it has to exit after SIGTERM, before SIGKILL
    process: subprocess.Popen | None = None
    started: float = 0.0
    starts: int = 0
    backoff: float = RESTART_MIN_S
    restart_at: float | None = None

    def start(self) -> None:
        # Own process group: a terminal's Ctrl-C reaches `serve` only, which stops
        # the children in order; a child whose `serve` dies gets SIGTERM.
        self.process = start_group(self.args)
        self.started = time.monotonic()
        self.starts += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("started %s, pid %d: %s", self.name, self.process.pid,
                      shlex.join(self.args))
        self.restart_at = None

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        """SIGKILL, if it still runs, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def fatal_failure(self, code: int) -> str | None:
        """Why serve must stop for this exit, or None if the child is to be restarted.
        A quick failure after a restart may pass (a new worker's id still held for its
        dead predecessor, a config file being edited): it keeps the back-off, unless a
        port the child needs is taken, which no restart frees."""
        if code == START_FAILED and self.starts == 1:  # however long its start took
            return self.why_it_failed(code)
        if code <= 0 or time.monotonic() - self.started >= START_FAILURE_S:
            return None
        return self.why_it_failed(code) if self.starts == 1 else self.port_taken()

    def why_it_failed(self, code: int) -> str:
        """One line: a port it could not listen on, and who holds it, if that is why."""
        return (self.port_taken()
                or f"{self.name} exited with code {code} at start-up (its error is above)")

    def port_taken(self) -> str | None:
        for host, port in self.ports:
            try:
                check_free(host, port)
            except OSError as e:
                return f"{self.name} cannot listen: {e}"
        return None


@dataclass
class Supervisor:
    groups: list[list[Child]]  # started in this order, stopped in reverse

    @property
    def children(self) -> list[Child]:
        return [child for group in self.groups for child in group]

    def start(self) -> None:
        for child in self.children:
            child.start()

    def check_ports(self) -> None:
        """Raise PortInUse, naming the holder, if a port a child needs is taken.
        The gateways' first: the HTTP port is the one the user chose."""
        for child in reversed(self.children):
            for host, port in child.ports:
                check_free(host, port)

    def watch_once(self) -> str | None:
        """Restart children that exited, each after its own growing back-off.

        Returns why serve cannot go on (a child failed at its first start, or cannot
        listen), or None."""
        now = time.monotonic()
        for child in self.children:
            code = child.exited()
            if code is None:
                continue
            failure = child.fatal_failure(code)
            if failure:
                return failure
            if child.restart_at is None:
                if now - child.started >= STABLE_AFTER_S:
                    child.backoff = RESTART_MIN_S
                child.restart_at = now + child.backoff
                log.warning("%s exited with code %d; restarting in %.1f s", child.name, code,
                            child.backoff)
                child.backoff = min(RESTART_MAX_S, child.backoff * 2)
            elif now >= child.restart_at:
                log.debug("restarting %s; the next back-off is %.1f s", child.name,
                          child.backoff)
                child.start()
        return None

    def stop(self, hurry: Callable[[], bool]) -> bool:
        """Stop the groups in reverse order; SIGKILL what does not stop in time, and
        everything once `hurry()` is true. Returns False if it had to hurry."""
        for group in reversed(self.groups):
            if not _terminate(group, max(c.stop_timeout for c in group), hurry):
                self.stop_at_once()
                return False
        return True

    def stop_at_once(self) -> None:
        """Stop every child at once. A second SIGTERM first: gateways then cut their
        streams with an error line, rather than just dropping the connections."""
        _terminate(self.children, HURRY_S)


def _terminate(children: list[Child], timeout: float,
               hurry: Callable[[], bool] = lambda: False) -> bool:
    """SIGTERM the children that run, and SIGKILL those still running after `timeout`.
    Returns False, leaving them running, as soon as `hurry()` is true."""
    running = [c for c in children if c.process is not None and c.exited() is None]
    for child in running:
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(c.exited() is None for c in running) and time.monotonic() < deadline:
        if hurry():
            return False
        time.sleep(POLL_S)
    for child in running:
        child.kill()
    return True


def child_args(command: str, name: str, args: argparse.Namespace, overrides: list[str],
               *extra: str) -> list[str]:
    """The command line of a child: the same config file, overrides and log options."""
    # `python -m zroute_cli.broker` (or worker, gateway) loads only what that process needs.
    line = [sys.executable, "-m", f"zroute_cli.{command}", "--supervised", "--log-name", name,
            "--log-level", args.log_level, "--log-format", args.log_format, *extra]
    if args.config:
        line += ["-f", args.config]
    return line + [f"--{override}" for override in overrides]


def build_supervisor(graph: Graph, config: Config, args: argparse.Namespace,
                     overrides: list[str]) -> Supervisor:
    """The brokers, each service's workers (those that others call first), the gateways."""
    in_graph = [] if args.graph is None else ["--graph", args.graph]
    pairs = config.broker.local_brokers()
    groups = [[Child(name, child_args("broker", name, args, overrides, *in_graph,
                                      "--frontend", front, "--backend", back),
                     [a for a in map(tcp_address, (front, back)) if a is not None],
                     STOP_MARGIN_S)
               for name, (front, back) in zip(broker_names(len(pairs)), pairs)]]
    for described in graph.worker_services:
        settings = section_of(config, described)
        which = [*in_graph, "--service-class", described.name] if in_graph else []
        names = [f"{described.name}-{i}" for i in range(1, settings.service_args.workers + 1)]
        groups.append([Child(name, child_args("worker", name, args, overrides, *which,
                                              "--id", name), [],
                             settings.drain_timeout + STOP_MARGIN_S) for name in names])
    # The gateways of this stack share their ports; no other process may.
    ports = [address for key, (_, address) in listeners(config, graph).items()
             if key in gateway_listeners(graph)]
    http = section_of(config, graph.root)
    groups.append([Child(f"gateway-{i}", child_args("gateway", f"gateway-{i}", args, overrides,
                                                    *in_graph, "--reuse-port"),
                         ports, http.drain_timeout + STOP_MARGIN_S)
                   for i in range(1, http.service_args.workers + 1)])
    return Supervisor(groups)


def broker_names(count: int) -> list[str]:
    """The names of serve's brokers in logs: "broker" alone, else broker-1, broker-2..."""
    return ["broker"] if count == 1 else [f"broker-{i}" for i in range(1, count + 1)]


def gateway_listeners(graph: Graph) -> dict[str, str]:
    """The gateways' listeners, by the key of their port, and the key of their host."""
    name = graph.root.name
    return {f"{name}.port": f"{name}.host", f"{name}.admin_port": f"{name}.admin_host"}


def listeners(config: Config, graph: Graph) -> dict[str, tuple[str, Address]]:
    """What serve listens on over tcp, by key: the HTTP port (and the operators', if it
    has one of its own) and the broker's endpoints, each as it is written and as
    (host, port)."""
    http, name = section_of(config, graph.root), graph.root.name
    ports = {f"{name}.port": (http.host, http.port)}
    if http.admin_port:
        ports[f"{name}.admin_port"] = (http.admin_host, http.admin_port)
    broker = {key: (endpoint, address) for key, endpoint in broker_endpoints(config).items()
              if (address := tcp_address(endpoint)) is not None}
    return {**{key: (f"{host}:{port}", (host, port)) for key, (host, port) in ports.items()},
            **broker}


BROKER_SIDES = ("frontend", "backend")


def broker_endpoints(config: Config) -> dict[str, str]:
    """The endpoints of serve's brokers, by the key that sets them: Broker.frontend and
    Broker.backend for the first, "broker 2's frontend"... for those derived from them."""
    endpoints = {}
    for index, pair in enumerate(config.broker.local_brokers()):
        for side, endpoint in zip(BROKER_SIDES, pair):
            key = f"Broker.{side}" if index == 0 else f"broker {index + 1}'s {side}"
            endpoints[key] = endpoint
    return endpoints


def _warn_unlisted_brokers(config: Config) -> None:
    """Say so when Broker.frontends or Broker.backends lists no endpoint on the port of a
    broker that serve runs here: nothing would connect to it. (A listed endpoint on its
    port may name another host; only the port can be told apart here.)"""
    broker = config.broker
    for index, pair in enumerate(broker.local_brokers()):
        for key, listed, own in (("frontends", broker.frontends, pair[0]),
                                 ("backends", broker.backends, pair[1])):
            if listed and not any(_same_port(own, endpoint) for endpoint in listed):
                log.warning("Broker.%s lists no endpoint of %s (%s): it starts, but no "
                            "peer connects to it; list it, or run fewer brokers "
                            "(Broker.ServiceArgs.workers)", key,
                            broker_names(len(broker.local_brokers()))[index], own)


def _same_port(own: str, endpoint: str) -> bool:
    """Whether `endpoint` may reach the broker bound at `own`: the same TCP port, or the
    same endpoint for other transports."""
    own_address, address = tcp_address(own), tcp_address(endpoint)
    if own_address is None or address is None:
        return own == endpoint
    return own_address[1] == address[1]


def check_addresses(config: Config, graph: Graph, host_key: str) -> None:
    """Before anything starts: every host to listen on resolves, and no HTTP port is one
    of the broker's (each would be taken twice). `host_key` is how the user set the
    HTTP host: --host or Frontend.host."""
    found = listeners(config, graph)
    own = gateway_listeners(graph)
    gateway = {key: address for key, (_, address) in found.items() if key in own}
    for key, (endpoint, (host, port)) in found.items():
        problem = unresolvable(host)
        if problem:
            where = host_key if key == f"{graph.root.name}.port" else own.get(key, key)
            raise ConfigError(f"{where}: the host {host!r} does not resolve ({problem}): give "
                              "an IP address such as 127.0.0.1, ::1 or 0.0.0.0, or a name "
                              "this machine resolves")
        for http_key, http in gateway.items():
            if key not in own and same_listener(http, (host, port)):
                raise ConfigError(f"{http_key} ({http[1]}) and {key} ({endpoint}) are the same "
                                  "port: the gateway and the broker each need their own")


def _second_stack_hint(config: Config, graph: Graph, port: int | None) -> str:
    """When another zroute stack holds `port`: the flags that give this one free ports
    in place of every one that is taken."""
    if port is None or not held_by_running_zroute(port):
        return ""
    flags, chosen = [], set()
    found = listeners(config, graph)
    # One broker's ports are each free to choose; several brokers' count up from two.
    several = config.broker.service_args.workers > 1
    for key, (endpoint, (host, taken)) in found.items():
        if (several and key not in gateway_listeners(graph)) or is_free(host, taken):
            continue
        free = free_port_from(host, taken + 1, chosen)
        if free is None:
            return ""
        chosen.add(free)
        flags.append(f"--port {free}" if key == f"{graph.root.name}.port"
                     else f"--{key}={free}" if key in gateway_listeners(graph)
                     else f"--{key}={endpoint.rpartition(':')[0]}:{free}")
    brokers = [found[key] for key in found if key not in gateway_listeners(graph)]
    if several and not all(is_free(host, port) for _, (host, port) in brokers):
        block = _free_broker_ports(brokers, chosen)
        if block is None:
            return ""
        for side, port in zip(BROKER_SIDES, block):
            endpoint = found[f"Broker.{side}"][0]
            flags.append(f"--Broker.{side}={endpoint.rpartition(':')[0]}:{port}")
    return f"; to run a second stack, give it other ports too: {' '.join(flags)}"


def _free_broker_ports(brokers: list[tuple[str, Address]],
                       chosen: set[int]) -> tuple[int, int] | None:
    """A frontend and a backend port for serve's brokers, after those taken now, from
    which every broker's ports (counting up by 2) are free; None if there are none."""
    host = brokers[0][1][0]
    start = max(port for _, (_, port) in brokers) + 1
    while start + len(brokers) <= 65536:
        first = free_port_from(host, start, chosen)
        if first is None:
            return None
        block = range(first, first + len(brokers))
        if all(port not in chosen and is_free(host, port) for port in block):
            chosen.update(block)
            return first, first + 1
        start = first + 1
    return None


# serve asks its own gateways, on this machine, whatever certificate they have.
OWN_GATEWAYS = ssl.create_default_context()
OWN_GATEWAYS.check_hostname = False
OWN_GATEWAYS.verify_mode = ssl.CERT_NONE


def get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=1, context=OWN_GATEWAYS) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    graph = load_graph(args.graph, "the graph")
    if not graph.root.is_http:
        raise ConfigError(f"{graph.root.name} has no @api routes: serve runs a graph from the "
                          "class that the gateway serves; run a service of endpoints alone "
                          "with `zroute worker --service-class`")
    name = graph.root.name
    # The children get --host and --port as overrides, like the rest.
    overrides = [*overrides, *flag_overrides({f"{name}.host": args.host,
                                              f"{name}.port": args.port})]
    config = load(args, overrides, graph=graph)
    http = section_of(config, graph.root)
    # The broker's own check of its policies, before anything starts: a bad
    # Frontend.routing_mode is then one line from serve.
    configured_policies(config)
    # The broker's and the gateways' own checks of their security settings, likewise.
    for problem in starting_problems(config, "serve", http):
        raise ConfigError(problem)
    check_addresses(config, graph, "--host" if args.host is not None else f"{name}.host")
    _warn_unlisted_brokers(config)
    supervisor = build_supervisor(graph, config, args, overrides)
    try:
        supervisor.check_ports()
    except PortInUse as e:
        raise PortInUse(f"{e}{_second_stack_hint(config, graph, e.port)}", e.port) from None
    stop_requested = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _: stop_requested.append(signum))
    supervisor.start()
    base = local_url(http.host, http.port, bool(http.tls_cert))
    try:
        code = _supervise(supervisor, base, graph, config, stop_requested)
    except BaseException:
        supervisor.stop_at_once()
        raise
    mark_stopping()
    # A second Ctrl-C that came while serve still slept in its loop counts too.
    signals_so_far = min(len(stop_requested), 1)
    in_flight = _in_flight(operators_url(http))
    if in_flight:
        log.info("stopping: gateways, then workers, then the broker; %d request(s) in flight; "
                 "waiting up to %g s (Ctrl-C again to stop at once)", in_flight,
                 http.drain_timeout)
    else:
        log.info("stopping: gateways, then workers, then the broker")
    if not supervisor.stop(hurry=lambda: len(stop_requested) > signals_so_far):
        log.warning("stopped at once: requests in flight were cut")
        return 1
    return code


def _supervise(supervisor: Supervisor, base: str, graph: Graph, config: Config,
               stop_requested: list) -> int:
    """Until a signal (0) or a failure (1): wait until the graph is ready, announce,
    restart children."""
    if not _wait_ready(supervisor, section_of(config, graph.root), graph, stop_requested):
        return 0 if stop_requested else 1
    _announce(base, graph, config)
    while not stop_requested:
        failure = supervisor.watch_once()
        if failure:
            log.error("%s; stopping", failure)
            return 1
        time.sleep(0.2)
    return 0


def _in_flight(base: str) -> int:
    """The requests in flight, queued ones too, as the broker counts them; 0 if no
    broker answers (the gateways then fail their requests at once)."""
    stats = get_json(f"{base}/stats")
    if not stats or "broker" not in stats:
        return 0
    return stats["broker"]["inflight"] + stats["broker"]["queue_depth"]


def _wait_ready(supervisor: Supervisor, http: FrontendSettings, graph: Graph,
                stop_requested: list) -> bool:
    """Until /health is green and every service has a worker: a request that reaches the
    root then finds every service it calls. It waits READY_TIMEOUT_S, and as long again
    each time for services whose @on_start hooks may still run (loading a model, say)."""
    base = local_url(http.host, http.port, bool(http.tls_cert))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop_requested:
        status = get_json(f"{base}/health")
        unserved = _services_without_workers(http, graph)
        if status and status.get("status") == "ok" and unserved == []:
            return True
        for child in supervisor.children:
            code = child.exited()
            if code is not None:
                log.error("%s; stopping", child.why_it_failed(code))
                return False
        if time.monotonic() > deadline:
            # Unknown while the gateway does not answer: its own hooks may run.
            pending = [graph.root, *graph.worker_services] if unserved is None else unserved
            starting = [s.name for s in pending if s.hooks[START]]
            if not starting:
                log.error("%s was not ready within %.0f s", base, READY_TIMEOUT_S)
                return False
            log.info("waiting for %s: its @on_start hooks may still run", ", ".join(starting))
            deadline += READY_TIMEOUT_S
        time.sleep(0.1)
    return False


def _services_without_workers(http: FrontendSettings, graph: Graph) -> list[Service] | None:
    """The services of endpoints that have no ready worker, as the broker's stats say;
    None if the gateway does not answer them."""
    stats = get_json(f"{operators_url(http)}/stats")
    if stats is None or "workers" not in stats:
        return None
    served = {name for w in stats["workers"] if w["state"] == "ready" for name in w["services"]}
    return [s for s in graph.worker_services
            if not served & {e.name for e in s.endpoints.values()}]


def operators_url(http: FrontendSettings) -> str:
    """Where /stats and /dashboard are: the admin_port's listener, if it has one."""
    tls = bool(http.tls_cert)
    if http.admin_port:
        return local_url(http.admin_host, http.admin_port, tls)
    return local_url(http.host, http.port, tls)


def _announce(base: str, graph: Graph, config: Config) -> None:
    http = section_of(config, graph.root)
    operators = operators_url(http)
    brokers = config.broker.service_args.workers
    several = f"{brokers} brokers, " if brokers > 1 else ""
    if graph.root.cls is builtin_graph().root.cls:
        what = (f"({config.backend.service_args.workers} worker(s), {several}greeting "
                f"{config.backend.greeting!r}, routing {http.routing_mode})")
        tries = [f"  curl -X POST {base}/generate -H 'Content-Type: application/json' "
                 "-d '{\"text\": \"world,universe,galaxy\"}'"]
    else:
        counts = ", ".join(f"{section_of(config, s).service_args.workers} {s.name}"
                           for s in graph.worker_services)
        what = f"({graph.root.name}; {several}workers: {counts})"
        tries = [try_route(base, route) for route in graph.root.routes.values()]
    print(f"\nzroute is serving on {base} {what}\nTry:\n" + "\n".join(tries) + "\n"
          f"  curl {operators}/stats    # or open {operators}/dashboard in a browser\n",
          flush=True)


def try_route(base: str, route: Route) -> str:
    """A curl command line for a route of the banner: a GET takes a query, the others
    a JSON body."""
    if route.method == "GET":
        return f"  curl '{base}{route.path}?key=value'"
    return (f"  curl -X {route.method} {base}{route.path} -H 'Content-Type: application/json' "
            "-d 'JSON'")
