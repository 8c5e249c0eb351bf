"""The settings of each component, typed: one frozen dataclass per section of the
configuration file, each field declared with its type, its default and what else a value
must be (bounds, a check).

A component takes its section (`Broker(settings: BrokerSettings)`), and a gateway or a
worker also the BrokerLink by which it reaches the broker; the command line builds them,
once per process, from the file and the `--Section.key=value` overrides
(zroute_cli/config.py), and checks every value then. A class attribute is its field's
default, as dataclasses make it (`BrokerSettings.frontend`): code that needs a default
takes it from there rather than repeat it.

A field's key in YAML is its name; a section's is given with it (`ServiceArgs`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from zroute.curve import PeerKeys
from zroute.endpoints import endpoint_problem, is_loopback
from zroute.ports import Address, same_listener, tcp_address
from zroute.protocol import DEFAULT_POLICY, MAX_BATCH_BYTES

T = TypeVar("T")

RULES = "zroute.rules"  # the metadata key of a field's Rules
KEY = "zroute.key"  # the metadata key of a section's name in YAML
# The broker's two allowlists of public keys, and the ZAP domains of its two sockets.
WORKERS = "workers"
CLIENTS = "clients"


@dataclass(frozen=True)
class Rules:
    """What a value of a setting must be besides its type: within the bounds (ge/gt/le),
    and without a problem that `check` names (it returns None for a good value).
    `clean`, if given, turns an accepted value into the one to use."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    check: Callable[[Any], str | None] | None = None
    clean: Callable[[Any], Any] | None = None


NO_RULES = Rules()


def setting(default: T, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, check: Callable[[Any], str | None] | None = None,
            clean: Callable[[Any], Any] | None = None) -> T:
    """A field of a settings class, `port: int = setting(8000, ge=1, le=65535)`: its type
    is the annotation's. A field without rules may be a plain default (`greeting: str =
    "Hello"`)."""
    rules = Rules(ge, gt, le, check, clean)
    return dataclasses.field(default=default, metadata={RULES: rules})


def section(cls: Callable[[], T], key: str) -> T:
    """A field that is a section of its own, named `key` in YAML."""
    return dataclasses.field(default_factory=cls, metadata={KEY: key})


def key_of(field: dataclasses.Field) -> str:
    return field.metadata.get(KEY, field.name)


def rules_of(field: dataclasses.Field) -> Rules:
    return field.metadata.get(RULES, NO_RULES)


class Section:
    """Base of the settings classes."""

    def as_dict(self) -> dict[str, Any]:
        """Nested plain dict with the YAML spelling of keys."""
        result: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            result[key_of(field)] = value.as_dict() if isinstance(value, Section) else value
        return result


def unbracketed(host: str) -> str:
    """The host as it is listened on: "[::1]", as in a URL, is "::1"."""
    return host.removeprefix("[").removesuffix("]")


def policy_spec_problem(specs: tuple[str, ...]) -> str | None:
    """Broker.policies names classes: a bare name would be a built-in policy, always valid."""
    for spec in specs:
        module, _, attribute = spec.rpartition(":")
        if not module or not attribute:
            return (f"{spec!r} is not a policy class: name one as module:Class or "
                    "path/to/file.py:Class (the built-in policies need no entry)")
    return None


# For each side of the brokers, the other, and who connects to it.
WORKER_OR_CLIENT = {"client": "worker", "worker": "client"}
ROLE_PEERS = {"client": "clients and gateways", "worker": "workers"}


def endpoints_problem(values: tuple[str, ...]) -> str | None:
    """A list of ZeroMQ endpoints (Broker.frontends, Broker.backends): each one valid,
    none twice. The problem names the entry, `[1]: ...`, right after the key."""
    for index, value in enumerate(values):
        problem = endpoint_problem(value)
        if problem:
            return f"[{index}]: {problem}"
        if value in values[:index]:
            return (f"[{index}]: {value!r} is listed already, at [{values.index(value)}]: "
                    "list each broker once")
    return None


def numbered_endpoint(endpoint: str, index: int) -> str:
    """The endpoint of the broker numbered `index` (from 0) of those that `zroute serve`
    runs from `endpoint`: for tcp://, the port plus 2 × index, so that the brokers'
    frontend and backend ports interleave (5555 and 5556, then 5557 and 5558...); for
    ipc:// and inproc://, the name with `-2`, `-3`... after it."""
    if index == 0:
        return endpoint
    address = tcp_address(endpoint)
    if address is None:
        return f"{endpoint}-{index + 1}"
    return f"{endpoint.rpartition(':')[0]}:{address[1] + 2 * index}"


def file_problem(value: str) -> str | None:
    """A setting that names a file: empty (none), or a path that is not a directory's."""
    if "\0" in value or "\n" in value:
        return f"{value!r} is not a file path"
    if value.endswith(("/", os.sep)):
        return f"{value!r} names a directory: give a file"
    return None


def directory_problem(value: str) -> str | None:
    if "\0" in value or "\n" in value:
        return f"{value!r} is not a directory path"
    return None


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(Section):
    """A worker's runtime settings, in the section of the service it serves (the built-in
    greeting's is `Backend`), beside the service's own keys."""

    @dataclass(frozen=True, kw_only=True)
    class ServiceArgs(Section):
        workers: int = setting(1, ge=1)
        capacity: int = setting(0, ge=0)  # 0 means unlimited

    drain_timeout: float = setting(30.0, ge=0)  # SIGTERM: finish in-flight work for this long
    # Send a handler's exception text to clients; else they get a request id to look up.
    expose_errors: bool = False
    # The worker's CURVE key pair (NAME.key_secret, from `zroute keys worker NAME`); empty:
    # none, for a broker without CURVE. A service with dependencies connects with it to
    # the broker's frontend too.
    curve_key: str = setting("", check=file_problem)
    service_args: ServiceArgs = section(ServiceArgs, "ServiceArgs")


@dataclass(frozen=True, kw_only=True)
class CallingWorkerSettings(WorkerSettings):
    """A worker's runtime settings, of a service with dependencies, which it calls."""

    # The policy of its calls that name none: a policy the broker loaded, as
    # FrontendSettings.routing_mode.
    routing_mode: str = DEFAULT_POLICY


class GatewayChecks:
    """What a gateway's settings (FrontendSettings' keys, in whichever section) say of
    themselves; a base of every class that holds them."""

    host: str
    port: int
    admin_host: str
    admin_port: int
    tls_cert: str
    tls_key: str

    def admin_clash(self) -> str | None:
        """Why the operators' listener cannot be apart from the users', if it cannot."""
        if not self.admin_port or not same_listener((self.host, self.port),
                                                    (self.admin_host, self.admin_port)):
            return None
        return (f"Frontend.admin_port ({self.admin_port}) is Frontend.port: give the "
                "operators' endpoints a port of their own, or 0 to serve them on "
                "Frontend.port with /generate")

    def tls_problem(self) -> str | None:
        """Why the TLS settings cannot be used as they are, if they cannot."""
        if bool(self.tls_cert) == bool(self.tls_key):
            return None
        given, missing = (("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert"))
        return (f"Frontend.{given} is set but not Frontend.{missing}: HTTPS needs both the "
                "certificate and its private key")


@dataclass(frozen=True, kw_only=True)
class FrontendSettings(GatewayChecks, Section):
    """The HTTP gateways', in the section of the service they serve (the built-in one's
    is `Frontend`), beside the service's own keys."""

    @dataclass(frozen=True, kw_only=True)
    class ServiceArgs(Section):
        workers: int = setting(1, ge=1)

    # A policy the broker loaded (zroute_cli/broker.py checks it at start): built-in,
    # or module:Class.
    routing_mode: str = DEFAULT_POLICY
    host: str = setting("127.0.0.1", clean=unbracketed)
    port: int = setting(8000, ge=1, le=65535)
    max_body: int = setting(1048576, ge=1)
    request_timeout: float = setting(60.0, gt=0)
    drain_timeout: float = setting(30.0, ge=0)  # SIGTERM: finish streams, then cut them
    # What one HTTP peer may cost the gateway, in time, connections and bytes.
    header_timeout: float = setting(10.0, gt=0)  # a request head, from its first byte
    body_timeout: float = setting(30.0, gt=0)  # a request body, from its head
    keepalive_timeout: float = setting(15.0, gt=0)  # an idle connection
    send_timeout: float = setting(30.0, gt=0)  # a client reading none of its reply
    max_connections: int = setting(0, ge=0)  # 0: from the open-file limit
    max_buffered_bytes: int = setting(32 << 20, ge=1)  # request bodies at once
    max_reply_buffer: int = setting(256 << 10, ge=1)  # per stream, ahead of its client
    max_queued_messages: int = setting(1000, ge=1)  # from the broker, not yet handled
    # The operators' endpoints (/stats, /stats/stream, /metrics, /dashboard) on a listener
    # of their own, so that /generate can be opened to users without them; port 0: they
    # are served on Frontend.port, with /generate.
    admin_host: str = setting("127.0.0.1", clean=unbracketed)
    admin_port: int = setting(0, ge=0, le=65535)
    stats_feed_interval: float = setting(1.0, ge=0.1, le=60)  # between /stats/stream events
    max_stats_feeds: int = setting(32, ge=1)  # /stats/stream connections at once
    # Send the exception text of a gateway route's function (a Call) to clients; else
    # they get a request id to look up in the gateway's log.
    expose_errors: bool = False
    # The gateway's CURVE key pair (`zroute keys client NAME`); `zroute stats` uses it too.
    curve_key: str = setting("", check=file_problem)
    # HTTPS on both listeners: a PEM certificate (chain) and its private key; both or
    # neither.
    tls_cert: str = setting("", check=file_problem)
    tls_key: str = setting("", check=file_problem)
    service_args: ServiceArgs = section(ServiceArgs, "ServiceArgs")


@dataclass(frozen=True, kw_only=True)
class BrokerSettings(Section):
    """The broker's; its peers take its endpoints and heartbeat from here too."""

    @dataclass(frozen=True, kw_only=True)
    class ServiceArgs(Section):
        # Brokers that `zroute serve` runs; each binds numbered_endpoint(frontend, i)
        # and numbered_endpoint(backend, i).
        workers: int = setting(1, ge=1)

    frontend: str = setting("tcp://127.0.0.1:5555", check=endpoint_problem)
    backend: str = setting("tcp://127.0.0.1:5556", check=endpoint_problem)
    heartbeat_interval: float = setting(1.0, gt=0)
    heartbeat_misses: int = setting(3, ge=1)
    max_retries: int = setting(2, ge=0)
    request_timeout: float = setting(60.0, gt=0)
    max_queue: int = setting(1000, ge=0)
    queue_timeout: float = setting(5.0, ge=0)
    max_queue_per_client: int = setting(250, ge=0)  # of all the queues, per client
    max_requests_per_client: int = setting(10_000, ge=1)  # held by the broker, per client
    # Bytes the broker holds: one request's body; a client's bodies and unread
    # replies; everyone's.
    max_request_bytes: int = setting(1 << 20, ge=1)
    max_client_bytes: int = setting(128 << 20, ge=1)
    max_buffered_bytes: int = setting(256 << 20, ge=1)
    # Peers pack messages into frames of up to MAX_BATCH_BYTES.
    max_message_size: int = setting(8388608, ge=MAX_BATCH_BYTES)
    max_workers: int = setting(1000, ge=1)  # live workers; a READY past it is refused
    max_services_per_worker: int = setting(64, ge=1)  # names one READY may declare
    max_departed_workers: int = setting(100, ge=0)  # evicted workers kept in stats
    stats_max_workers: int = setting(100, ge=1)  # workers listed in one stats reply
    stats_interval: float = setting(0.1, ge=0)  # STATS past a client's share wait this long at most
    # Policy classes (module:Class) a request may name besides the built-in ones.
    policies: tuple[str, ...] = setting((), check=policy_spec_problem)
    # CURVE (docs/DEPLOY.md). The broker's key pair, broker.key_secret from `zroute keys
    # init`; empty: no CURVE, which a broker listening beyond loopback refuses unless
    # `insecure`.
    curve_secret_key: str = setting("", check=file_problem)
    # The broker's public key, as its peers take it (broker.key); empty: the one in
    # curve_secret_key, for peers on the broker's host.
    curve_public_key: str = setting("", check=file_problem)
    # The public keys (*.key) that the backend (workers) and the frontend (clients and
    # gateways) accept; empty: workers/ and clients/ beside curve_secret_key.
    curve_workers_dir: str = setting("", check=directory_problem)
    curve_clients_dir: str = setting("", check=directory_problem)
    # Listen beyond loopback without CURVE: anyone who reaches a port may serve or send
    # any request.
    insecure: bool = False
    # Every broker's endpoints as its peers connect to them (brokers that run elsewhere
    # too); empty: those of the brokers `zroute serve` runs from frontend and backend.
    frontends: tuple[str, ...] = setting((), check=endpoints_problem)
    backends: tuple[str, ...] = setting((), check=endpoints_problem)
    service_args: ServiceArgs = section(ServiceArgs, "ServiceArgs")

    def local_brokers(self) -> list[tuple[str, str]]:
        """(frontend, backend) of each broker that `zroute serve` runs here."""
        return [(numbered_endpoint(self.frontend, i), numbered_endpoint(self.backend, i))
                for i in range(self.service_args.workers)]

    def client_endpoints(self) -> tuple[str, ...]:
        """Every broker's client endpoint, as gateways and clients connect to them."""
        return self.frontends or tuple(front for front, _ in self.local_brokers())

    def worker_endpoints(self) -> tuple[str, ...]:
        """Every broker's worker endpoint, as workers connect to them."""
        return self.backends or tuple(back for _, back in self.local_brokers())

    def brokers_problem(self) -> str | None:
        """Why the brokers as configured cannot be told apart or reached, if so: two of
        the brokers serve runs here on one port, a port past 65535, lists of different
        lengths, or a client endpoint that is a worker endpoint too."""
        if self.frontends and self.backends and len(self.frontends) != len(self.backends):
            return (f"Broker.frontends lists {len(self.frontends)} endpoints and "
                    f"Broker.backends {len(self.backends)}: list each broker's client and "
                    "worker endpoint, in the same order")
        for key, listed, others, role, other_key in (
                ("frontends", self.frontends, self.worker_endpoints(), "client", "backend"),
                ("backends", self.backends, self.client_endpoints(), "worker", "frontend")):
            for index, endpoint in enumerate(listed):
                if endpoint in others:
                    return (f"Broker.{key}[{index}]: {endpoint} is a broker's "
                            f"{WORKER_OR_CLIENT[role]} endpoint (Broker.{other_key}s, or "
                            f"Broker.{other_key}): {ROLE_PEERS[role]} connect to the brokers' "
                            f"{role} endpoints")
        seen: dict[Address, str] = {}
        for index, pair in enumerate(self.local_brokers()):
            for key, endpoint in zip(("frontend", "backend"), pair):
                address = tcp_address(endpoint)
                if address is None:
                    continue
                if address[1] > 65535:
                    return (f"Broker.ServiceArgs.workers: broker {index + 1}'s {key} would be "
                            f"port {address[1]}: give Broker.frontend and Broker.backend "
                            "lower ports, or run fewer brokers")
                clash = next((name for taken, name in seen.items()
                              if same_listener(taken, address)), None)
                if clash:
                    return (f"Broker.ServiceArgs.workers: broker {index + 1}'s {key} "
                            f"({endpoint}) would be {clash} too: brokers take ports counting up by "
                            "2 from Broker.frontend and Broker.backend; give those two "
                            "neighbouring ports (e.g. 5555 and 5556)")
                seen[address] = f"broker {index + 1}'s {key}"
        return None

    def endpoint_clash(self) -> str | None:
        """Why the two endpoints cannot both be bound, if they cannot: clients and workers
        speak different protocols, so each needs its own socket."""
        front, back = tcp_address(self.frontend), tcp_address(self.backend)
        same_port = front is not None and back is not None and same_listener(front, back)
        if self.frontend != self.backend and not same_port:
            return None
        return (f"Broker.frontend ({self.frontend}) and Broker.backend ({self.backend}) are "
                "the same endpoint: clients connect to Broker.frontend and workers to "
                "Broker.backend, so each needs its own (by default "
                f"{BrokerSettings.frontend} and {BrokerSettings.backend})")

    def allowlist(self, role: str) -> str:
        """The directory of the public keys that the endpoint of `role` ("workers" or
        "clients") accepts."""
        configured = self.curve_workers_dir if role == WORKERS else self.curve_clients_dir
        return configured or os.path.join(os.path.dirname(self.curve_secret_key), role)

    def exposed_endpoints(self) -> list[str]:
        """The endpoints that other hosts may reach, as "Broker.backend (tcp://...)"."""
        return [f"Broker.{key} ({endpoint})"
                for key, endpoint in (("frontend", self.frontend), ("backend", self.backend))
                if not is_loopback(endpoint)]

    def exposure_problem(self) -> str | None:
        """Why the broker must not start as configured, if it must not: it would listen
        beyond loopback in plaintext, without having been told that this is meant."""
        exposed = self.exposed_endpoints()
        if self.curve_secret_key or self.insecure or not exposed:
            return None
        return (f"{' and '.join(exposed)} can be reached from other hosts, and the broker has "
                "no CURVE keys: create them with `zroute keys init --dir keys` and set "
                "Broker.curve_secret_key=keys/broker.key_secret (docs/DEPLOY.md), or set "
                "Broker.insecure=true to accept anyone")

    def for_clients(self, curve: PeerKeys | None = None) -> BrokerLink:
        """The brokers as their clients (gateways) reach them, with their keys if they
        have CURVE."""
        return BrokerLink(self.client_endpoints(), self.heartbeat_interval,
                          self.heartbeat_misses, curve, self.max_message_size)

    def for_workers(self, curve: PeerKeys | None = None) -> BrokerLink:
        """The brokers as their workers reach them, with their keys if they have CURVE."""
        return BrokerLink(self.worker_endpoints(), self.heartbeat_interval,
                          self.heartbeat_misses, curve, self.max_message_size)


@dataclass(frozen=True)
class BrokerLink:
    """What a peer of the brokers knows of them: the endpoints it connects to (one per
    broker; a single string is one broker's), the heartbeat by which each of them knows
    that the other is alive, the CURVE keys it connects with (None: without CURVE), and
    the largest frame a broker takes (a larger one makes it drop the connection)."""

    endpoints: tuple[str, ...] | str
    heartbeat_interval: float = BrokerSettings.heartbeat_interval
    heartbeat_misses: int = BrokerSettings.heartbeat_misses
    curve: PeerKeys | None = None
    max_message_size: int = BrokerSettings.max_message_size

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str):
            object.__setattr__(self, "endpoints", (self.endpoints,))


@dataclass(frozen=True, kw_only=True)
class Config(Section):
    """The whole configuration of a service graph: a class made for each graph
    (zroute_cli/config.py), with a section per service, named by its class
    (``config.backend.greeting``, the section `Backend`), and ``config.broker``."""
