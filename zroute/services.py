"""Services as classes: the model that `zroute serve FILE_OR_MODULE:Class` runs.

    @service(workers=2)
    class Backend:
        greeting: str = "Hello"          # a config key: Backend.greeting

        @endpoint                        # the broker's service "Backend.generate"
        async def generate(self, text: str):
            yield f"{self.greeting} {text}!\\n"

    @service
    class Frontend:
        backend = depends(Backend)       # a routed client of Backend's endpoints

        @api(path="/generate", method="POST")   # served by the HTTP gateway
        async def generate(self, request: dict):
            async for chunk in self.backend.generate(request["text"]):
                yield chunk

A service is a class marked `@service`. Its `@endpoint` methods are served by worker
processes (`ServiceArgs.workers` of them), each registered with the broker under
`Class.method` (or `@endpoint(name=...)`), so that every routing policy, capacity, queue,
retry and the stats apply to them. A class with `@api` routes is served over HTTP by the
gateway instead; only the root of a graph may have routes. An endpoint or a route is an
async generator function, whose yields stream to the caller as they come, or a coroutine
function, whose return value is its one chunk; it takes one argument, the request as its
caller passed it (anything JSON can carry). A chunk is str (sent as UTF-8), bytes (as they
are), or any other value JSON can carry (a dict, a list, a number...), sent as its JSON
text: one chunk, one JSON text (zroute/chunks.py). A value JSON cannot carry fails the
request with an error that names the method and the type.

`depends(Other)` makes an attribute that, on a running instance, calls Other's endpoints:
`self.backend.generate(x)` streams the callee's chunks as str, `.raw()` of it as bytes
unchanged (what a stage relays), `.values()` of it as the JSON values that the callee
yielded or returned; `.round_robin(x)`,
`.random(x)`, `.direct(x, worker_id)` and `.request(x, policy=...)` choose the routing per
call, and `await self.backend.workers()` lists Other's ready workers with their load (the
process's calls share one broker STATS at a time, and its answer for 0.1 s). A call
without a policy uses the calling service's section's `routing_mode` (Frontend.routing_mode
for the gateway's, Middle.routing_mode for a worker service with dependencies), whether
the class declares it or not. The dependency calls a request makes are cancelled when that
request ends (its caller went away, say); a call left early (`break`) runs on until then,
unless it is closed: `async with self.backend.generate(x) as chunks:`, or
`chunks.cancel()`. An error of the callee raises CallError with its `code` in the caller.
A call's argument goes as JSON, always: the callee receives what was passed. Its deadline
is `timeout=` (seconds) if given, else the calling process's: Broker.request_timeout in a
worker, Frontend.request_timeout in the gateway.

Annotated class attributes with a default are configuration, read from the YAML section
named after the class (`Backend: {greeting: Hi}`, `--Backend.greeting=Hi`); one without a
default is required. A setting is a str, int, float or bool, each may be `X | None` (YAML
null, `--Backend.model=null`), or a list[str] or tuple[str, ...]. The section holds the
runtime settings of the process that runs the service as well (a worker's drain_timeout,
ServiceArgs.workers...; a gateway's port...).

`@on_start` methods run before a process takes requests (a worker before it registers,
a gateway before it listens), and `@on_stop` ones once it has drained. A class's own
`__init__`, if it has one, runs before them, once its settings and dependencies are set;
it takes no argument besides self.

`walk(Root)` checks a graph and returns its services, dependencies first; every mistake in
it is a GraphError whose text is one line naming the class and what to fix. `Instance`
runs one service in a process: zroute_cli builds it, worker/service.py runs it in a worker
and zroute_cli/gateway.py in a gateway. `zroute serve FILE_OR_MODULE:Root -f config.yaml`
starts the whole graph (zroute_cli/serve.py).
"""

from __future__ import annotations

import asyncio
import codecs
import contextvars
import dataclasses
import inspect
import logging
import typing
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, ClassVar, Generator

import orjson

from zroute import protocol as p
from zroute.client import BrokerError, Client, Stream, WorkerId
from zroute.errors import StartFailed

log = logging.getLogger("zroute.services")

CallError = BrokerError  # what a failed dependency call raises; `.code` says why

SERVICE = "__zroute_service__"
ENDPOINT = "__zroute_endpoint__"
ROUTE = "__zroute_route__"
HOOK = "__zroute_hook__"
START, STOP = "on_start", "on_stop"
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
RESERVED_NAMES = ("Broker",)  # sections of the configuration that no service may take


class GraphError(Exception):
    """A service graph that cannot run; str() is one line naming the class and the fix."""


# --- marking classes and methods ------------------------------------------------------


@dataclass(frozen=True)
class ServiceOptions:
    workers: int = 1  # the default of the section's ServiceArgs.workers


def service(cls: type | None = None, *, workers: int = 1) -> Any:
    """Mark a class as a service: `@service`, or `@service(workers=2)` for the default
    number of its worker (or gateway) processes, which ServiceArgs.workers overrides."""
    def mark(target: type) -> type:
        setattr(target, SERVICE, ServiceOptions(workers))
        return target
    return mark if cls is None else mark(cls)


def endpoint(function: Callable | None = None, *, name: str | None = None) -> Any:
    """Mark a method as an endpoint, registered as `Class.method` or as `name`."""
    def mark(target: Callable) -> Callable:
        setattr(target, ENDPOINT, name)
        return target
    return mark if function is None else mark(function)


@dataclass(frozen=True)
class RouteMark:
    path: str
    method: str
    forward: str | None = None  # the attribute, on a dependency, of an endpoint to pass to


def api(path: str, method: str = "POST") -> Callable[[Callable], Callable]:
    """Mark a method as an HTTP route of the gateway: it takes the request's JSON body,
    or, for GET, its query parameters as a dict of str. A path may have one route per
    method."""
    if not isinstance(path, str):  # @api without its path
        raise GraphError(f"@api needs the route's path: @api(path=\"/generate\"), not "
                         f"@api on {getattr(path, '__qualname__', path)!r}")

    def mark(target: Callable) -> Callable:
        setattr(target, ROUTE, RouteMark(path, str(method).upper()))
        return target
    return mark


def forward(path: str, dependency: Dependency, endpoint_attribute: str) -> Any:
    """A route that the gateway passes, as it comes, to an endpoint of a dependency,
    with what the gateway's /generate does besides: ?routing=, ?worker=, X-Worker-Id and
    every streaming format. `generate = forward("/generate", backend, "generate")`."""
    return ForwardRoute(RouteMark(path, "POST", endpoint_attribute), dependency)


@dataclass(frozen=True)
class ForwardRoute:
    mark: RouteMark
    dependency: Dependency


def on_start(function: Callable) -> Callable:
    """Run this method (async, or not) before the process takes requests."""
    setattr(function, HOOK, START)
    return function


def on_stop(function: Callable) -> Callable:
    """Run this method (async, or not) once the process has drained."""
    setattr(function, HOOK, STOP)
    return function


class Dependency:
    """`backend = depends(Backend)`: on a running instance, a ServiceClient of Backend."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.attribute = "?"

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        raise RuntimeError(f"{type(instance).__name__}.{self.attribute} is bound when zroute "
                           "runs the service (zroute serve, zroute worker --service-class)")


def depends(target: type) -> Any:
    """A dependency on the service class `target`: a routed client of its endpoints."""
    return Dependency(target)


# --- describing a class, and walking a graph -------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    attribute: str  # the method's name
    name: str  # the broker's service name


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    attribute: str
    forward: tuple[str, str] | None = None  # (dependency attribute, endpoint attribute)


@dataclass(frozen=True)
class Setting:
    name: str
    type: Any
    default: Any  # dataclasses.MISSING: required


@dataclass
class Service:
    """One class of a graph, as zroute runs it."""

    cls: type
    workers: int
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # by attribute
    routes: dict[tuple[str, str], Route] = field(default_factory=dict)  # by (method, path)
    dependencies: dict[str, Service] = field(default_factory=dict)  # by attribute
    hooks: dict[str, list[str]] = field(default_factory=lambda: {START: [], STOP: []})
    settings: list[Setting] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def is_http(self) -> bool:
        """Served by the gateway (it has routes), not by workers."""
        return bool(self.routes)


@dataclass(frozen=True)
class Graph:
    """A root service and everything it depends on, dependencies first."""

    root: Service
    services: tuple[Service, ...]

    def service(self, name: str) -> Service:
        for candidate in self.services:
            if candidate.name == name:
                return candidate
        raise GraphError(f"no service named {name!r} in the graph of {self.root.name} "
                         f"(its services: {', '.join(s.name for s in self.services)})")

    @property
    def worker_services(self) -> list[Service]:
        """The services that worker processes run (all but an HTTP root)."""
        return [s for s in self.services if not s.is_http]


def _members(cls: type) -> dict[str, Any]:
    """The class's attributes, its bases' first, each name once (the latest wins)."""
    members: dict[str, Any] = {}
    for klass in reversed(cls.__mro__[:-1]):  # without object
        members.update(vars(klass))
    return members


def _what_it_is(value: Any) -> str:
    if inspect.isclass(value):
        return f"the class {value.__name__}"
    return f"the {type(value).__name__} {value!r:.60}"


def _check_callable(owner: str, attribute: str, function: Any, kind: str) -> None:
    """An endpoint or a route: an async generator function or a coroutine function that
    takes one argument besides self."""
    if not (inspect.isasyncgenfunction(function) or inspect.iscoroutinefunction(function)):
        raise GraphError(f"{owner}.{attribute}: an {kind} is an async def (with yield to "
                         "stream its chunks, or returning its one chunk), not a plain "
                         "function")
    try:
        inspect.signature(function).bind(None, None)
    except TypeError:
        raise GraphError(f"{owner}.{attribute}: an {kind} takes one argument besides self, "
                         "the request") from None


def describe(cls: Any) -> Service:
    """The service that the class `cls` is; GraphError if it is not one zroute can run."""
    if not inspect.isclass(cls) or SERVICE not in vars(cls):
        raise GraphError(f"{_what_it_is(cls)} is not a service: mark the class with @service")
    options: ServiceOptions = vars(cls)[SERVICE]
    name = cls.__name__
    if name.lower() in (reserved.lower() for reserved in RESERVED_NAMES):
        raise GraphError(f"{name}: a service cannot be named {name} (the section of that "
                         "name configures zroute itself): rename the class")
    if isinstance(options.workers, bool) or not isinstance(options.workers, int) \
            or options.workers < 1:
        raise GraphError(f"{name}: @service(workers={options.workers!r}) is invalid: must be "
                         "an integer >= 1")
    _check_init(cls)
    described = Service(cls, options.workers)
    members = _members(cls)
    for attribute, value in members.items():
        _describe_member(described, attribute, value)
    described.settings = _settings(cls, members)
    if described.routes and described.endpoints:
        raise GraphError(f"{name} has both @api routes and @endpoints: a class is served "
                         "over HTTP by the gateway or to other services by workers; split it "
                         "in two")
    if not described.routes and not described.endpoints:
        raise GraphError(f"{name} has no @endpoint and no @api route: nothing would serve it")
    return described


def _check_init(cls: type) -> None:
    """zroute calls a service's __init__ with no arguments (Instance.bind): say so now,
    not once its process has started."""
    if cls.__init__ is object.__init__:
        return
    try:
        inspect.signature(cls.__init__).bind(None)
    except TypeError:
        raise GraphError(f"{cls.__name__}.__init__ takes arguments besides self, but zroute "
                         "creates the instance with none: make them settings (annotated "
                         "attributes) or give them defaults") from None
    except ValueError:  # a signature Python cannot tell (a builtin base's): it will tell
        pass


def _describe_member(described: Service, attribute: str, value: Any) -> None:
    owner = described.name
    if isinstance(value, ForwardRoute):
        _add_route(described, attribute, value.mark, forward=value.dependency)
        return
    function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    if not callable(function):
        return
    if hasattr(function, ENDPOINT):
        _check_callable(owner, attribute, function, "endpoint")
        given = getattr(function, ENDPOINT)
        broker_name = given if given is not None else f"{owner}.{attribute}"
        problem = (p.name_problem(broker_name) if isinstance(broker_name, str)
                   else "is not a string")
        if problem:
            raise GraphError(f"{owner}.{attribute}: the endpoint name {broker_name!r} "
                             f"{problem}: give a name of printable characters")
        described.endpoints[attribute] = Endpoint(attribute, broker_name)
    if hasattr(function, ROUTE):
        _check_callable(owner, attribute, function, "@api route")
        _add_route(described, attribute, getattr(function, ROUTE))
    hook = getattr(function, HOOK, None)
    if hook is not None:
        described.hooks[hook].append(attribute)


def _add_route(described: Service, attribute: str, mark: RouteMark,
               forward: Dependency | None = None) -> None:
    owner = described.name
    if not mark.path.startswith("/"):
        raise GraphError(f"{owner}.{attribute}: the path {mark.path!r} must start with /")
    if mark.method not in HTTP_METHODS:
        raise GraphError(f"{owner}.{attribute}: the method {mark.method!r} is not one of "
                         f"{', '.join(HTTP_METHODS)}")
    key = (mark.method, mark.path)
    other = described.routes.get(key)
    if other is not None:
        raise GraphError(f"{owner}: the route {mark.method} {mark.path} is declared twice, by "
                         f"{other.attribute} and {attribute}: give each its own path or method")
    target = None if forward is None else (forward.attribute, mark.forward or "")
    described.routes[key] = Route(mark.path, mark.method, attribute, target)


def _settings(cls: type, members: dict[str, Any]) -> list[Setting]:
    """The annotated attributes that configure the class: public, not ClassVar, not a
    dependency."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # a name an annotation uses is not defined, say
        raise GraphError(f"{cls.__name__}: its annotations cannot be read: "
                         f"{type(e).__name__}: {e}") from None
    found = []
    for name, kind in hints.items():
        default = members.get(name, dataclasses.MISSING)
        if name.startswith("_") or typing.get_origin(kind) is ClassVar \
                or isinstance(default, (Dependency, ForwardRoute)):
            continue
        found.append(Setting(name, kind, default))
    return found


def walk(root: Any) -> Graph:
    """The graph of `root`: it and every service it depends on, checked."""
    described: dict[type, Service] = {}
    order: list[Service] = []

    def visit(cls: Any, path: list[type]) -> Service:
        if cls in described:
            return described[cls]
        if cls in path:
            cycle = " -> ".join(c.__name__ for c in [*path[path.index(cls):], cls])
            raise GraphError(f"the services depend on each other in a cycle: {cycle}; "
                             "a graph must have none")
        node = describe(cls)
        for attribute, dependency in _dependencies(cls).items():
            where = f"{node.name}.{attribute}"
            if not (inspect.isclass(dependency.target) and SERVICE in vars(dependency.target)):
                raise GraphError(f"{where} = depends({_what_it_is(dependency.target)}): a "
                                 "dependency is a class marked @service")
            target = visit(dependency.target, [*path, cls])
            if target.is_http:
                raise GraphError(f"{where}: {target.name} has @api routes, so it is served "
                                 "over HTTP; a dependency is a service with @endpoints")
            node.dependencies[attribute] = target
        for route in node.routes.values():
            _check_forward(node, route)
        described[cls] = node
        order.append(node)
        return node

    top = visit(root, [])
    _check_unique(order)
    for node in order:
        if node.is_http and node is not top:
            raise GraphError(f"{node.name} has @api routes but is not the root of the graph")
    return Graph(top, tuple(order))


def _dependencies(cls: type) -> dict[str, Dependency]:
    return {attribute: value for attribute, value in _members(cls).items()
            if isinstance(value, Dependency)}


def _check_forward(node: Service, route: Route) -> None:
    if route.forward is None:
        return
    attribute, target_endpoint = route.forward
    dependency = node.dependencies.get(attribute)
    if dependency is None or target_endpoint not in dependency.endpoints:
        raise GraphError(f"{node.name}.{route.attribute}: forward() names no endpoint "
                         f"{attribute}.{target_endpoint} of a dependency of {node.name}")


def _check_unique(services: list[Service]) -> None:
    """Each class's name is its section, and each endpoint's its service at the broker."""
    names: dict[str, Service] = {}
    endpoints: dict[str, str] = {}
    for node in services:
        other = names.setdefault(node.name.lower(), node)
        if other is not node:
            raise GraphError(f"two services are named {node.name!r} ({other.cls.__module__} and "
                             f"{node.cls.__module__}): each names its own config section, so "
                             "rename one")
        for found in node.endpoints.values():
            where = f"{node.name}.{found.attribute}"
            taken = endpoints.setdefault(found.name, where)
            if taken != where:
                raise GraphError(f"{where} and {taken} both register as {found.name!r} with the "
                                 "broker: give one another @endpoint(name=...)")


# --- calling dependencies --------------------------------------------------------------

# The dependency streams the current request has opened, cancelled when it ends.
_open_streams: contextvars.ContextVar[set[CallStream] | None] = contextvars.ContextVar(
    "zroute_open_streams", default=None)


def encode_argument(argument: Any) -> bytes:
    """What a dependency call sends: its argument as JSON, always, so that the callee
    receives exactly what was passed (the str "123" stays a str)."""
    try:
        return orjson.dumps(argument)
    except TypeError as e:
        raise TypeError(f"a service call's argument must be what JSON carries: {e}") from None


class CallStream:
    """The reply to one dependency call: an async iterator of str chunks, as the callee
    yields them; `.raw()` gives them as bytes, `.values()` as the values JSON chunks
    hold. An error of the callee raises CallError (`.code`)."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tracked = _open_streams.get()
        self._tracked = tracked
        if tracked is not None:
            tracked.add(self)

    @property
    def worker_id(self) -> str | None:
        """The worker that serves the call, once its first chunk has come."""
        return self._stream.worker_id

    def __aiter__(self) -> CallStream:
        return self

    def __await__(self) -> Generator[None, None, CallStream]:
        """`stream = await self.backend.generate(x)` gives the stream itself."""
        return self
        yield  # a generator function, as __await__ must be; it never suspends

    async def __anext__(self) -> str:
        while True:
            text = self._decoder.decode(await self._next_chunk())
            if text:
                return text

    async def raw(self) -> AsyncIterator[bytes]:
        """The chunks as bytes, as the callee sent them: what a stage relays unchanged
        (binary chunks, say). A stream is read as str or as bytes, not both."""
        while True:
            try:
                yield await self._next_chunk()
            except StopAsyncIteration:
                return

    async def values(self) -> AsyncIterator[Any]:
        """Each chunk decoded as the JSON text it is: the values a callee yields or
        returns that are not str or bytes (a dict, a list...)."""
        async for chunk in self.raw():
            try:
                yield orjson.loads(chunk)
            except orjson.JSONDecodeError as e:
                raise ValueError(f"a chunk of the reply is not JSON ({e}): {chunk[:60]!r}; "
                                 "read it as str, or with raw()") from None

    async def _next_chunk(self) -> bytes:
        try:
            return await self._stream.__anext__()
        except BaseException:
            self._untrack()
            raise

    async def read(self) -> str:
        """The whole reply, joined."""
        return "".join([chunk async for chunk in self])

    def cancel(self) -> None:
        """Stop the call: the callee's handler is cancelled."""
        self._stream.cancel()
        self._untrack()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> CallStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    def _untrack(self) -> None:
        if self._tracked is not None:
            self._tracked.discard(self)
            self._tracked = None


@dataclass(frozen=True)
class WorkerLoad:
    """A live worker of a dependency, as the broker's stats show it."""

    id: str
    services: list[str]
    state: str
    inflight: int
    capacity: int  # 0: unlimited
    completed: int
    failed: int

    @property
    def load(self) -> float:
        """In flight against capacity (in flight alone for an unlimited worker)."""
        return self.inflight / self.capacity if self.capacity else float(self.inflight)


class SharedStats:
    """A client's broker stats of one service's workers, shared by every workers() call
    of the process: one STATS at a time, its answer reused for MAX_AGE seconds. So a route
    that lists the workers per request costs the broker one STATS per MAX_AGE, not one per
    request (which the broker answers once per Broker.stats_interval, refusing past 100
    waiting)."""

    MAX_AGE = 0.1  # seconds; Broker.stats_interval's default
    _of_client: weakref.WeakKeyDictionary[Client, dict[str, SharedStats]] = \
        weakref.WeakKeyDictionary()  # a process's dependencies' services: a few per client

    def __init__(self, client: Client, service: str) -> None:
        self._client = client
        self._service = service
        self._asking: asyncio.Future[dict] | None = None
        self._answer: dict | None = None
        self._asked_at = 0.0

    @classmethod
    def of(cls, client: Client, service: str) -> SharedStats:
        by_service = cls._of_client.setdefault(client, {})
        if service not in by_service:
            by_service[service] = cls(client, service)
        return by_service[service]

    async def get(self) -> dict:
        """The stats as of at most MAX_AGE ago: the last answer, or the STATS in flight's."""
        now = asyncio.get_running_loop().time()
        if self._answer is not None and now - self._asked_at < self.MAX_AGE:
            return self._answer
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._ask(now))
        # One caller that goes away does not cancel the others' answer.
        return await asyncio.shield(self._asking)

    async def _ask(self, now: float) -> dict:
        try:  # an error is no answer to reuse: the next call asks again
            self._answer = await self._client.stats(service=self._service)
            self._asked_at = now
            return self._answer
        finally:
            self._asking = None


class EndpointClient:
    """`self.backend.generate`: calls one endpoint of a dependency."""

    def __init__(self, client: Client, name: str, policy: str) -> None:
        self._client = client
        self.name = name  # the broker's service name
        self._policy = policy

    def __call__(self, argument: Any, *, timeout: float | None = None) -> CallStream:
        """Call with the calling service's routing_mode (its section's)."""
        return self.request(argument, policy=self._policy, timeout=timeout)

    def request(self, argument: Any, *, policy: str = "", worker: WorkerId = "",
                timeout: float | None = None) -> CallStream:
        """Call with any policy (a built-in one, or a class the broker loaded), or
        `policy="direct"` and a `worker`."""
        return CallStream(self._client.request(self.name, encode_argument(argument),
                                               policy=policy, worker=worker, timeout=timeout))

    def round_robin(self, argument: Any, **options: Any) -> CallStream:
        return self.request(argument, policy="round_robin", **options)

    def random(self, argument: Any, **options: Any) -> CallStream:
        return self.request(argument, policy="random", **options)

    def direct(self, argument: Any, worker_id: WorkerId, **options: Any) -> CallStream:
        return self.request(argument, policy=p.DIRECT, worker=worker_id, **options)


class ServiceClient:
    """`self.backend`: the endpoints of one dependency, by their method names."""

    def __init__(self, target: Service, client: Client, policy: str) -> None:
        self._target = target
        self._client = client
        self._endpoints = {attribute: EndpointClient(client, found.name, policy)
                           for attribute, found in target.endpoints.items()}

    def __getattr__(self, attribute: str) -> EndpointClient:
        try:
            return self.__dict__["_endpoints"][attribute]
        except KeyError:
            raise AttributeError(f"{self._target.name} has no endpoint {attribute!r} "
                                 f"(its endpoints: {', '.join(self._endpoints)})") from None

    async def workers(self) -> list[WorkerLoad]:
        """The ready workers of this dependency, with their load as of at most
        SharedStats.MAX_AGE ago: those that serve its first endpoint, as every worker of
        the class does, up to Broker.stats_max_workers of them."""
        first = next(iter(self._target.endpoints.values())).name
        stats = await SharedStats.of(self._client, first).get()
        return [WorkerLoad(w["id"], w["services"], w["state"], w["inflight"], w["capacity"],
                           w["completed"], w["failed"])
                for w in stats["workers"] if w["state"] == "ready"]


# --- running an instance -----------------------------------------------------------------


Handler = Callable[[Any], AsyncIterator["bytes | str"]]


def _raised(where: str, error: Exception) -> str:
    """One line: `Backend.setup raised ValueError: ...`."""
    return f"{where} raised {type(error).__name__}: {' '.join(str(error).split())}"


class Instance:
    """An instance of a service, with its settings applied; bind() gives it the broker
    client its dependencies call through, and runs the class's own __init__."""

    def __init__(self, described: Service, settings: Any) -> None:
        self.service = described
        cls = described.cls
        self.obj = cls.__new__(cls)
        for found in described.settings:
            setattr(self.obj, found.name, getattr(settings, found.name))
        # The section's, whether the class declares it or not (Frontend.routing_mode).
        self._routing_mode: str = getattr(settings, "routing_mode", "")

    def bind(self, client: Client | None) -> Instance:
        """Bind the dependencies to `client` (None for a service without any), then run
        the class's __init__, if it has one; StartFailed, one line, if it raises."""
        for attribute, target in self.service.dependencies.items():
            if client is None:
                raise ValueError(f"{self.service.name} has dependencies: it needs a client")
            setattr(self.obj, attribute, ServiceClient(target, client, self._routing_mode))
        if type(self.obj).__init__ is not object.__init__:
            try:
                self.obj.__init__()
            except Exception as e:
                raise StartFailed(_raised(f"{self.service.name}.__init__", e)) from e
        return self

    async def start(self) -> None:
        """Run the @on_start hooks; StartFailed, one line, if one raises."""
        for attribute in self.service.hooks[START]:
            log.info("%s.%s: starting", self.service.name, attribute)  # it may take long
            try:
                await self._call(attribute)
            except Exception as e:
                raise StartFailed(_raised(f"{self.service.name}.{attribute}", e)) from e

    async def stop(self) -> None:
        """Run the @on_stop hooks; one that raises is logged, and the others still run."""
        for attribute in self.service.hooks[STOP]:
            try:
                await self._call(attribute)
            except Exception:
                log.exception("%s.%s raised", self.service.name, attribute)

    async def _call(self, attribute: str) -> None:
        result = getattr(self.obj, attribute)()
        if inspect.isawaitable(result):
            await result

    def handlers(self) -> dict[str, Handler]:
        """The endpoints as the worker runtime serves them, by their broker names."""
        return {found.name: self.function(found.attribute)
                for found in self.service.endpoints.values()}

    def function(self, attribute: str) -> Handler:
        """A method, endpoint or route, as an async generator of its chunks that cancels
        the dependency calls it opened when it ends."""
        method = getattr(self.obj, attribute)
        streams = inspect.isasyncgenfunction(method)

        async def run(request: Any) -> AsyncIterator[bytes | str]:
            opened: set[CallStream] = set()
            _open_streams.set(opened)  # in this request's task, and those it starts
            try:
                if streams:
                    async for chunk in method(request):
                        yield chunk
                else:
                    result = await method(request)
                    if result is not None:
                        yield result
            finally:
                for call in list(opened):
                    call.cancel()

        run.__qualname__ = f"{self.service.name}.{attribute}"
        return run
