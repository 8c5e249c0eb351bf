"""The HTTP gateway: its routes stream replies (POST /generate, a worker's, by default);
/health and /stats.

Each gateway process holds one broker Client (one DEALER socket) shared by all
its HTTP requests. A route either forwards its request to a broker service or calls
a function in the gateway process (gateway/routes.py); both stream alike. A reply's
first chunk decides the status: errors before it become 4xx/5xx with a JSON body; an
error after it ends the stream visibly (gateway/formats.py), so that a broken stream
never reads as a complete one.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import string
import time
from http import HTTPStatus
from typing import Any, Awaitable, Callable
from urllib.parse import quote

import orjson
from aiohttp import HttpVersion10, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from multidict import MultiMapping
from prometheus_client import CONTENT_TYPE_LATEST

from zroute import protocol as p
from zroute.client import BrokerError, Client, Stream
from zroute.errors import StartFailed
from zroute.protocol import DIRECT
from zroute.ratelimit import LogLimiter
from gateway.dashboard import page_handler
from gateway.feed import StatsFeed
from gateway.formats import STREAM_HEADERS, negotiate
from gateway.metrics import Exporter, GatewayMetrics, total
from gateway.routes import DEFAULT_ROUTES, CallStream, Forward, Route, Routes, check_routes
from gateway.transport import reset
from zroute.settings import BrokerLink, FrontendSettings
from zroute.logs import fields

log = logging.getLogger("zroute.gateway")
# What HTTP peers get wrong, logged once per kind of mistake and interval (10 s).
peer_errors = LogLimiter(log)

RETRY_AFTER_S = "1"
CLIENT_CLOSED = 499  # the status logged for a client gone before its first line
E_GATEWAY_STOPPING = "gateway_stopping"  # a request cut at the end of the gateway's drain

# Broker error codes, as HTTP statuses.
STATUS_OF_ERROR = {
    p.E_BAD_REQUEST: 400,
    p.E_UNKNOWN_POLICY: 400,
    p.E_NO_SUCH_WORKER: 404,
    p.E_HANDLER: 502,
    p.E_WORKER_LOST: 502,
    p.E_POLICY: 502,
    p.E_WRONG_ENDPOINT: 502,
    p.E_NO_WORKERS: 503,
    p.E_QUEUE_FULL: 503,
    p.E_LIMIT: 503,  # the gateway's client is over a per-client limit of the broker
    p.E_BROKER_UNREACHABLE: 503,
    p.E_AUTH_FAILED: 503,  # the broker refused the gateway's key: its log says why
    E_GATEWAY_STOPPING: 503,
    p.E_TIMEOUT: 504,
}


# The gateway's own error codes; the others are the broker's (zroute/protocol.py).
E_NOT_FOUND = "not_found"
E_METHOD_NOT_ALLOWED = "method_not_allowed"
E_BODY_TOO_LARGE = "body_too_large"
E_EXPECTATION_FAILED = "expectation_failed"
E_INTERNAL = "internal_error"
E_HEADER_TIMEOUT = "header_timeout"
E_BODY_TIMEOUT = "body_timeout"
E_TOO_MANY_CONNECTIONS = "too_many_connections"
E_GATEWAY_BUSY = "gateway_busy"
E_TOO_MANY_FEEDS = "too_many_feeds"

SERVER = "zroute"  # aiohttp's default Server header names its version
SERVER_HEADERS = {"Server": SERVER}
# Printable ASCII but "%": what a header may carry of a peer's value as it is.
HEADER_SAFE = "".join(c for c in string.printable if c not in "%\t\n\r\x0b\x0c")
# What a body that is not JSON is told to send: the built-in /generate takes {"text": ...}.
JSON_HINT = "send a JSON value with Content-Type: application/json"
GENERATE_HINT = ('send a JSON object such as {"text": "a,b"} with Content-Type: '
                 "application/json")


class HttpError(Exception):
    """An error answered with a JSON body `{"error": message, "code": code}`."""

    def __init__(self, status: int, message: str, code: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.close = close  # the body was not read whole: the connection closes after it


def json_response(body: dict, status: int = 200, retry_after: int | None = None) -> web.Response:
    headers = ({"Server": SERVER, "Retry-After": str(retry_after or RETRY_AFTER_S)}
               if status == 503 else SERVER_HEADERS)
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def error_response(error: HttpError) -> web.Response:
    return json_response({"error": error.message, "code": error.code}, error.status,
                         p.retry_after(error.message))  # the broker's estimate


def raw_error(status: int, message: str, code: str) -> bytes:
    """A whole JSON error response, for a connection that gets it without a request."""
    body = orjson.dumps({"error": message, "code": code})
    retry_after = f"Retry-After: {RETRY_AFTER_S}\r\n" if status == 503 else ""
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nServer: {SERVER}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{retry_after}Connection: close\r\n\r\n").encode() + body


def header_value(value: str) -> str:
    """A peer-chosen value as a header may carry it: percent-escaped unless it is all
    printable ASCII, so that it can neither end its header nor add one."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe=HEADER_SAFE)


HTTP09_REFUSAL = raw_error(400, "HTTP/0.9 is not supported: send a request line that ends "
                                "with HTTP/1.1 or HTTP/1.0", p.E_BAD_REQUEST)


def refuse_http09(request: web.BaseRequest) -> web.StreamResponse:
    """An HTTP/0.9 request: aiohttp would answer it with an "HTTP/0.9" status line. The
    refusal goes out as HTTP/1.1, and the connection closes."""
    request.transport.write(HTTP09_REFUSAL)
    request.protocol.force_close()
    return web.Response()  # never sent: the connection is closed already


def stop_reading(request: web.BaseRequest) -> None:
    """Read no more of this connection: the answer goes out, then it closes. Otherwise
    aiohttp would read the rest of the body first, for up to 10 s: a slow client's, or
    one refused for lack of room, and a body that failed to decode fails again there,
    logged as an unhandled error."""
    request.protocol.close()  # parses nothing more; closes after the response
    request.content.feed_eof()


RouteHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def by_method(handlers: dict[str, RouteHandler]) -> dict[str, RouteHandler]:
    """A path's handlers by method, HEAD answered as GET is."""
    return {**handlers, "HEAD": handlers["GET"]} if "GET" in handlers else handlers


def query_of(request: web.BaseRequest) -> dict[str, str]:
    """What a GET route receives: the query parameters, each given once; a body is
    refused (aiohttp bounds the query, with the request line, to 8190 bytes)."""
    if request.body_exists:
        stop_reading(request)
        raise HttpError(400, f"{request.method} {request.path} takes its parameters from "
                             "the query string, not a body", p.E_BAD_REQUEST, close=True)
    return single_values(request.query)


def single_values(query: MultiMapping[str]) -> dict[str, str]:
    """The query's parameters; a 400 if one is given twice, since which of the two the
    user meant cannot be known."""
    if len(query) == len(set(query)):
        return dict(query)
    repeated = next(key for key in query if len(query.getall(key)) > 1)
    raise HttpError(400, f"the query gives {repeated!r} more than once: give each parameter "
                         "once", p.E_BAD_REQUEST)


def unavailable(message: str, code: str) -> web.Response:
    """/health's 503: its status, and an error like any other."""
    return json_response({"status": "unavailable", "workers": 0, "error": message,
                          "code": code}, 503)


class GatewayConnection(RequestHandler):
    """aiohttp's connection handler with the gateway's limits on a connection: one over
    Frontend.max_connections is answered 503 and closed, a request head must arrive within
    Frontend.header_timeout, and a client that reads nothing of its reply for
    Frontend.send_timeout is cut off. Errors it answers itself (to a request that does
    not parse as HTTP, or a handler that raised) are JSON with a code, like the others."""

    def __init__(self, manager: GatewayServer, **kwargs: object) -> None:
        super().__init__(manager, **kwargs)
        self.settings = manager.settings
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._manager
        if server is not None and server.over_capacity():
            peer_errors.warn("too many connections",
                             f"refused connections over Frontend.max_connections "
                             f"({self.settings.max_connections})")
            self._refused = True
            transport.write(server.refusal)
            # Half-closed: the client reads the answer, and its close ends the connection
            # (or the keep-alive timeout does). Closing at once could reset it unread.
            transport.write_eof()
        else:
            self._start_head_timer()  # the first head is due too

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped, so that the close is not a reset
        super().data_received(data)
        if self._messages:  # a whole head came: the handler's limits apply now
            self._cancel_head_timer()
        elif data and self._waiter is not None and self._head_timer is None:
            self._start_head_timer()  # part of a head came between requests

    def _start_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self.settings.header_timeout,
                                                 self._head_too_slow)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport is not None:
            peer_errors.warn("slow head", "cut connections whose request head took longer than "
                             f"Frontend.header_timeout ({self.settings.header_timeout:g} s)")
            self.transport.write(raw_error(
                408, f"the request head did not arrive within Frontend.header_timeout "
                     f"({self.settings.header_timeout:g} s)", E_HEADER_TIMEOUT))
        self.force_close()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._send_timer = self._loop.call_later(self.settings.send_timeout,
                                                 self._send_too_slow)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_send_timer()

    def _send_too_slow(self) -> None:
        self._send_timer = None
        if self.transport is not None:
            peer_errors.warn("slow reader", "cut connections that read nothing for "
                             f"Frontend.send_timeout ({self.settings.send_timeout:g} s)")
            reset(self.transport)  # the handler is cancelled

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status < 500:
            # Not valid HTTP: the peer's mistake, one log line, no traceback. Nothing of
            # a response has been written yet: the request did not parse.
            kind = reason(message)
            peer_errors.warn(kind, f"rejected requests that are not valid HTTP: {kind}")
            code = p.E_BAD_REQUEST
        else:
            super().handle_error(request, status, exc, message)  # logs it; raises if too late
            code = E_INTERNAL
        response = error_response(HttpError(status, message or HTTPStatus(status).phrase, code))
        response.force_close()
        return response


class RequestRecord:
    """What the metrics and the log line say of one request to a route: filled in as
    the request goes, and written once, at its end."""

    __slots__ = ("started", "path", "rid", "policy", "worker", "status", "first_chunk",
                 "chunks", "error")

    def __init__(self, path: str, policy: str) -> None:
        self.started = time.monotonic()
        self.path = path  # the route's
        self.rid = b"-"  # the request id, once the request is sent
        self.policy = policy  # the policy label (see unjudged); "-" for a Call
        self.worker = ""  # the worker that sent the first line
        self.status = 0  # 0 until the request has its answer
        self.first_chunk: float | None = None  # when the first line came
        self.chunks = 0
        self.error = ""  # why the request failed, before its first line or after it


def refusal(record: RequestRecord, error: HttpError) -> web.Response:
    """The answer to a request refused before it was sent or called."""
    record.status, record.error = error.status, error.message
    response = error_response(error)
    if error.close:
        response.force_close()
    return response


def unjudged(request: web.BaseRequest, policy: str) -> str:
    """The policy label of a request the broker has not answered: a ?routing= name it
    has not accepted is no label, since a label per bad value would grow the metrics
    without bound. The default was judged when the broker started."""
    return "-" if "routing" in request.query else policy


def reason(message: str | None) -> str:
    """The kind of a parser error, without the peer's bytes that follow it (a log line
    per distinct text would let a peer fill the log)."""
    return (message or "").partition(":")[0].strip() or "unknown"


class GatewayServer(web.Server):
    """aiohttp's low-level server, with GatewayConnection for its connections."""

    def __init__(self, handler: object, settings: FrontendSettings, **kwargs: object) -> None:
        super().__init__(handler, keepalive_timeout=settings.keepalive_timeout, **kwargs)
        self.settings = settings
        self.refusal = raw_error(503, f"the gateway holds its limit of connections "
                                      f"(Frontend.max_connections, {settings.max_connections})",
                                 E_TOO_MANY_CONNECTIONS)

    def over_capacity(self) -> bool:
        return len(self._connections) > self.settings.max_connections

    def __call__(self) -> RequestHandler:
        return GatewayConnection(self, loop=self._loop, **self._kwargs)


def brokers_health(stats: dict) -> dict:
    """What /health says of the brokers of a deployment that runs several: how many
    answered, and the endpoints of those that did not (it is ok while one answers)."""
    brokers = stats["brokers"]
    if len(brokers) == 1:
        return {}
    down = [broker["endpoint"] for broker in brokers if not broker["reachable"]]
    return {"brokers": len(brokers) - len(down), "unreachable": down}


class ReplyResponse(web.StreamResponse):
    """A chunked response whose headers leave with its first chunk, in one write,
    as web.Response's do, rather than in a write of their own at prepare()."""

    _send_headers_immediately = False


class Gateway:
    """Serves HTTP with the `Frontend` section's settings, whose max_connections must be
    a number (its 0, the open-file limit, is the command line's to resolve), through the
    broker at `broker`. `name` is the gateway's in /stats and /metrics (empty:
    hostname-pid); it reports its counters to the broker once a heartbeat.

    `routes` maps a path to a Forward or a Call, or to a list of them of different
    methods (gateway/routes.py); by default POST /generate forwards to the broker's "generate" service. A route on one of the
    operators' paths is a ValueError. `client` is the gateway's broker client, the one
    that code in the gateway process (a Call's function) sends its requests with.
    `on_start` and `on_stop` are awaited in start() and stop(): around serving.

    Which policies are valid is the broker's to say: it answers unknown_policy."""

    def __init__(self, settings: FrontendSettings, broker: BrokerLink, name: str = "",
                 routes: Routes | None = None,
                 on_start: Callable[[], Awaitable[None]] | None = None,
                 on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
        operators = {
            "/health": by_method({"GET": self.health}),
            "/stats": by_method({"GET": self.stats}),
            "/stats/stream": by_method({"GET": self.stats_stream}),
            "/metrics": by_method({"GET": self.prometheus}),
            "/dashboard": by_method({"GET": page_handler(SERVER_HEADERS)}),
        }
        given = DEFAULT_ROUTES if routes is None else routes
        checked = check_routes(given, tuple(operators))  # before anything is opened
        self.settings = settings
        self.broker = broker
        self.metrics = GatewayMetrics()
        self.client = Client(broker.endpoints, timeout=settings.request_timeout,
                             timeout_setting="Frontend.request_timeout",
                             heartbeat_interval=broker.heartbeat_interval,
                             heartbeat_misses=broker.heartbeat_misses,
                             report=self.metrics.snapshot, name=name,
                             max_buffered_bytes=settings.max_reply_buffer,
                             receive_hwm=settings.max_queued_messages, curve=broker.curve,
                             max_message_size=broker.max_message_size)
        # What a request is told when no broker answers.
        self.unreachable = ("the broker is unreachable" if len(broker.endpoints) == 1 else
                            f"no broker is reachable ({', '.join(broker.endpoints)})")
        self.buffered_bytes = 0  # request bodies being read or sent; Frontend.max_buffered_bytes
        self.exporter = Exporter()
        self.bad_reports = LogLimiter(log)

        self.feed = StatsFeed(self.stats_snapshot, settings.stats_feed_interval,
                              settings.max_stats_feeds, SERVER_HEADERS)

        self.on_start = on_start
        self.on_stop = on_stop
        self.calls: set[CallStream] = set()  # the Call routes' streams in flight
        self._call_ids = itertools.count(1)

        # path -> method -> handler. Dict lookups: aiohttp's router costs a share of the
        # gateway's CPU per request that a few routes do not need.
        users = {path: by_method({route.method: self._handler(path, route) for route in found})
                 for path, found in checked.items()}
        users["/health"] = operators["/health"]
        # With Frontend.admin_port, the operators' endpoints are on a listener of their own.
        self.routes = users if settings.admin_port else {**users, **operators}
        self.admin_routes = operators if settings.admin_port else {}

    def server(self, routes: dict | None = None) -> web.Server:
        """aiohttp's low-level server for `routes` (the /generate listener's by default)."""
        handler = functools.partial(self.handle, self.routes if routes is None else routes)
        return GatewayServer(handler, self.settings, request_factory=self._make_request,
                             handler_cancellation=True, access_log=None)

    def _make_request(self, message: RawRequestMessage, payload: StreamReader,
                      protocol: RequestHandler, writer: AbstractStreamWriter,
                      task: asyncio.Task) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, task.get_loop(),
                               client_max_size=self.settings.max_body)

    def _handler(self, path: str, route: Route) -> RouteHandler:
        if isinstance(route, Forward):
            builtin = DEFAULT_ROUTES.get(path) == route
            return functools.partial(self.forward, route.service,
                                     GENERATE_HINT if builtin else JSON_HINT)
        return functools.partial(self.call, route.function)

    async def start(self) -> None:
        """Connect to the broker, then await on_start: its code may send requests.
        StartFailed, in one line, if on_start raises (its traceback is logged at debug
        level): the one on_start raised, which names what failed already, or one made
        of what it raised; the client is closed again."""
        self.client.connect()
        if self.on_start is None:
            return
        try:
            await self.on_start()
        except Exception as e:
            log.debug("on_start failed", exc_info=True)
            await self.client.close()
            if isinstance(e, StartFailed):
                raise
            text = " ".join(str(e).split())  # one line, whatever the exception says
            raise StartFailed(f"the gateway's on_start failed: {type(e).__name__}: "
                              f"{text}") from None

    async def stop(self) -> None:
        try:
            if self.on_stop is not None:
                await self.on_stop()
        finally:
            await self.client.close()

    def cut_streams(self) -> None:
        """End every request still in flight: the gateway is stopping. Each ends as a
        failed worker's would, so a cut stream never looks like a complete one."""
        error = BrokerError(E_GATEWAY_STOPPING, "the gateway stopped before the reply finished")
        for reply in list(self.client.replies.values()):
            reply.cancel(error)
        for call in list(self.calls):
            call.cancel(error)

    async def handle(self, routes: dict, request: web.BaseRequest) -> web.StreamResponse:
        if request.version < HttpVersion10:
            return refuse_http09(request)
        methods = routes.get(request.path)
        if methods is None:
            return error_response(HttpError(404, f"no such path {request.path!r}; "
                                                 "the paths are " + ", ".join(routes),
                                            E_NOT_FOUND))
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(methods)
            response = error_response(HttpError(405, f"{request.path} takes {allowed}, "
                                                     f"not {request.method}",
                                                E_METHOD_NOT_ALLOWED))
            response.headers["Allow"] = allowed
            return response
        expect = request.headers.get("Expect")
        if expect is not None:  # answered by aiohttp's router, not by its low-level server
            if expect.lower() != "100-continue":
                return error_response(HttpError(417, f"Expect: {expect} is not supported "
                                                     "(only 100-continue is)",
                                                E_EXPECTATION_FAILED))
            if request.version >= (1, 1):  # HTTP/1.0 has no interim responses
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await handler(request)

    # --- the routes: Forward and Call ------------------------------------------

    async def forward(self, service: str, json_hint: str,
                      request: web.BaseRequest) -> web.StreamResponse:
        """A Forward route: the body to the broker's `service`, a worker's reply back;
        `json_hint` says what to send instead of a body that is not JSON."""
        record = RequestRecord(request.path, unjudged(request, self.settings.routing_mode))
        try:
            try:
                stream, policy = await self._send(request, service, json_hint)
            except HttpError as e:
                return refusal(record, e)
            record.rid, record.policy = stream.rid, unjudged(request, policy)
            return await self._serve(request, stream, policy, record)
        finally:
            if record.status:  # else the client left with its body unread, or the gateway failed
                self._write(record)

    async def call(self, function: Callable[[Any], Any],
                   request: web.BaseRequest) -> web.StreamResponse:
        """A Call route: what `function(body)` yields, from this process; for GET (and
        HEAD), `function(query)`."""
        record = RequestRecord(request.path, "-")  # no routing: no policy
        try:
            try:
                body = (query_of(request) if request.method in ("GET", "HEAD")
                        else await self._receive(request))
            except HttpError as e:
                return refusal(record, e)
            settings = self.settings
            stream = CallStream(function, body, b"c%x" % next(self._call_ids), request.path,
                                settings.request_timeout, settings.max_reply_buffer,
                                settings.expose_errors, self.client.name)
            record.rid = stream.rid
            self.calls.add(stream)
            try:
                return await self._serve(request, stream, "-", record)
            finally:
                self.calls.discard(stream)
        finally:
            if record.status:
                self._write(record)

    async def _serve(self, request: web.BaseRequest, stream: Stream | CallStream, policy: str,
                     record: RequestRecord) -> web.StreamResponse:
        self.metrics.inflight += 1
        try:
            return await self._stream(request, stream, policy, record)
        finally:
            self.metrics.inflight -= 1
            stream.cancel()  # no-op once the reply is complete

    async def _send(self, request: web.BaseRequest, service: str,
                    json_hint: str) -> tuple[Stream, str]:
        """Read the body within Frontend.max_buffered_bytes and send the request. The
        body is let go once sent: the stream may last minutes, and needs none of it."""
        reserved = self._reserve(request)
        try:
            body, _ = await self._read_json(request, json_hint)
            policy, worker = self._routing(request)
            return self.client.request(service, body, policy=policy, worker=worker), policy
        finally:
            self.buffered_bytes -= reserved

    async def _receive(self, request: web.BaseRequest) -> Any:
        """The body, decoded, read within Frontend.max_buffered_bytes."""
        reserved = self._reserve(request)
        try:
            _, value = await self._read_json(request, JSON_HINT)
            return value
        finally:
            self.buffered_bytes -= reserved

    def _reserve(self, request: web.BaseRequest) -> int:
        """Count the request's body against Frontend.max_buffered_bytes before it is read;
        503 if it would go over. A chunked or compressed body may grow to max_body."""
        max_body = self.settings.max_body
        length = request.content_length
        size = (max_body if length is None or "Content-Encoding" in request.headers
                else min(length, max_body))
        if self.buffered_bytes + size > self.settings.max_buffered_bytes:
            stop_reading(request)
            peer_errors.warn("gateway busy", "refused requests over Frontend.max_buffered_bytes "
                             f"({self.settings.max_buffered_bytes} bytes of bodies at once)")
            raise HttpError(503, "the gateway holds its limit of request bodies "
                                 f"(Frontend.max_buffered_bytes, "
                                 f"{self.settings.max_buffered_bytes} bytes); retry later",
                            E_GATEWAY_BUSY, close=True)
        self.buffered_bytes += size
        return size

    async def _read_json(self, request: web.BaseRequest, json_hint: str) -> tuple[bytes, Any]:
        """The body and its JSON value; an empty body is None for a GET route."""
        try:
            if request.content.is_eof():  # the usual case: it came with the head
                body = await request.read()
            else:
                body = await asyncio.wait_for(request.read(), self.settings.body_timeout)
        except web.HTTPRequestEntityTooLarge:
            raise HttpError(413, f"body is larger than Frontend.max_body "
                                 f"({self.settings.max_body} bytes)", E_BODY_TOO_LARGE) from None
        except asyncio.TimeoutError:
            stop_reading(request)
            raise HttpError(408, f"the body did not arrive within Frontend.body_timeout "
                                 f"({self.settings.body_timeout:g} s)", E_BODY_TIMEOUT,
                            close=True) from None
        except RequestPayloadError as e:  # e.g. Content-Encoding: gzip on a body that is not
            stop_reading(request)
            detail = str(getattr(e.__cause__, "message", "") or e).strip()
            kind = reason(detail)
            peer_errors.warn(kind, f"rejected bodies that do not decode: {kind}")
            raise HttpError(400, f"body does not decode: {detail}", p.E_BAD_REQUEST,
                            close=True) from None
        if not body and request.method in ("GET", "HEAD"):
            return body, None
        # Only JSON passes; what it must hold is the handler's to say (the greeting's
        # BadRequest is a 400 too), so that a custom handler receives any JSON body.
        try:
            return body, orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise HttpError(400, f"body is not valid JSON ({e}): {json_hint}",
                            p.E_BAD_REQUEST) from None

    def _routing(self, request: web.BaseRequest) -> tuple[str, str]:
        """The policy and the worker that the query names. Only the query's own rules are
        checked here: ?worker= routes directly, so it goes with no other routing, and
        routing=direct needs it. Whether a policy exists is the broker's to say."""
        query = single_values(request.query) if request.query_string else {}
        worker = query.get("worker", "")
        policy = query.get("routing") or (DIRECT if worker else self.settings.routing_mode)
        if policy == DIRECT and not worker:
            raise HttpError(400, "routing=direct needs ?worker=<worker id>", p.E_BAD_REQUEST)
        if worker and policy != DIRECT:
            raise HttpError(400, f"?worker= routes directly; it cannot be combined with "
                                 f"routing={policy}", p.E_BAD_REQUEST)
        if not self.client.broker_alive:
            raise HttpError(503, self.unreachable, p.E_BROKER_UNREACHABLE)
        return policy, worker

    async def _stream(self, request: web.BaseRequest, stream: Stream | CallStream, policy: str,
                      record: RequestRecord) -> web.StreamResponse:
        try:
            await stream.first()
        except BrokerError as e:
            record.status = STATUS_OF_ERROR.get(e.code, 502)
            # A label per bad value would grow the metrics without bound.
            record.policy = "invalid" if e.code == p.E_UNKNOWN_POLICY else policy
            record.error = e.code
            return error_response(HttpError(record.status, e.message, e.code))
        except asyncio.CancelledError:
            # Gone before the first line: 499, as nginx logs it ("client closed request").
            self.metrics.disconnects += 1
            record.status, record.error = CLIENT_CLOSED, "client disconnected"
            raise
        record.first_chunk = time.monotonic()
        record.status, record.policy, record.worker = 200, policy, stream.worker_id or ""
        reply_format = negotiate(request.headers.get("Accept"))  # plain text, SSE or NDJSON
        headers = {"Server": SERVER, "Content-Type": reply_format.content_type, **STREAM_HEADERS}
        if stream.worker_id is not None:  # a Call is served by no worker
            headers["X-Worker-Id"] = header_value(record.worker)
        response = ReplyResponse(headers=headers)
        if request.version >= (1, 1):
            response.enable_chunked_encoding()
        # else HTTP/1.0, which has no chunks: the body ends when the connection closes.
        try:
            await response.prepare(request)
            while True:
                batch = await stream.batch()
                record.chunks += len(batch)
                data = reply_format.encode(batch, stream.complete)
                del batch  # a client slow to read holds these chunks once, not twice
                if stream.complete:
                    # The last chunks, the terminating chunk (and, for a reply that
                    # came at once, the headers) leave in one write.
                    await response.write_eof(data)
                    break
                await response.write(data)
        except BrokerError as e:
            self.metrics.incomplete += 1
            record.error = e.code
            try:
                await response.write(reply_format.error(e.code, e.message))
                if reply_format.ends_in_band:  # SSE, NDJSON: the error is their end
                    await response.write_eof()
            except ConnectionResetError:
                pass  # the client is gone too; there is nobody left to tell
            if not reply_format.ends_in_band and request.transport is not None:
                # Plain text has no end of its own: it closes without the terminating
                # chunk, so that the transfer reads as incomplete.
                request.transport.close()
        except (asyncio.CancelledError, ConnectionResetError) as e:
            # The HTTP client went away; the caller's cancel() stops the worker's work.
            self.metrics.disconnects += 1
            record.error = "client disconnected"
            if isinstance(e, asyncio.CancelledError):
                raise
            # A reset is not raised on: aiohttp would log it as a 500.
        return response

    def _write(self, record: RequestRecord) -> None:
        """Count the request in the metrics and write its log line."""
        started = record.started
        duration = time.monotonic() - started
        ttfc = None if record.first_chunk is None else record.first_chunk - started
        self.metrics.observe(record.status, record.policy, record.worker, record.path, duration,
                             ttfc)
        if log.isEnabledFor(logging.INFO):  # the fields cost more than a skipped call
            error = record.error
            log.info("", extra=fields(request=record.rid.decode(), policy=record.policy,
                                      worker=record.worker or None, status=record.status,
                                      ttfc=ttfc, duration=duration, chunks=record.chunks,
                                      path=record.path, **({"error": error} if error else {})))

    # --- /health and /stats ------------------------------------------------

    async def _broker_stats(self) -> dict:
        """The brokers' stats, combined; BrokerError if none answers."""
        if not self.client.broker_alive:
            raise BrokerError(p.E_BROKER_UNREACHABLE, self.unreachable)
        return await self.client.stats(timeout=2.0)

    async def health(self, _: web.BaseRequest) -> web.Response:
        try:
            stats = await self._broker_stats()
        except BrokerError as e:
            return unavailable(e.message, e.code)
        workers = stats["broker"]["workers_ready"]  # the list of workers may be truncated
        if workers:
            return json_response({"status": "ok", "workers": workers, **brokers_health(stats)})
        return unavailable("no worker is registered", p.E_NO_WORKERS)

    async def stats(self, _: web.BaseRequest) -> web.Response:
        try:
            stats, _ = await self.stats_snapshot()
        except BrokerError as e:
            return error_response(HttpError(503, e.message, e.code))
        return json_response(stats)

    async def stats_snapshot(self) -> tuple[dict, dict[str, GatewayMetrics]]:
        """What /stats answers: the broker's stats with every gateway's counters; and
        those gateways' metrics. BrokerError if the broker does not answer."""
        stats = await self._broker_stats()
        gateways = self._gateways(stats)
        summaries = {name: metrics.summary() for name, metrics in gateways.items()}
        stats["gateways"] = summaries
        stats["gateway"] = total(list(summaries.values()))
        return stats, gateways

    async def stats_stream(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.feed.full:
            return error_response(HttpError(
                503, f"the gateway serves its limit of stats feeds (Frontend.max_stats_feeds, "
                     f"{self.settings.max_stats_feeds}); close one, or retry later",
                E_TOO_MANY_FEEDS))
        return await self.feed.stream(request)

    async def prometheus(self, _: web.BaseRequest) -> web.Response:
        try:
            broker_stats = await self._broker_stats()
        except BrokerError:
            broker_stats = None  # the gateway's own metrics are still worth a scrape
        return web.Response(body=self.exporter.render(broker_stats, self._gateways(broker_stats)),
                            headers={"Server": SERVER, "Content-Type": CONTENT_TYPE_LATEST})

    def _gateways(self, broker_stats: dict | None) -> dict[str, GatewayMetrics]:
        """Every gateway's counts as last reported to the broker, so that every gateway
        process answers the same. This one's own live counts stand in for its report
        until the broker has one (it started, or restarted, a moment ago)."""
        gateways = {}
        reports = broker_stats.get("gateways", {}) if broker_stats else {}
        for name, snapshot in reports.items():
            try:
                gateways[name] = GatewayMetrics.from_snapshot(snapshot)
            except ValueError as e:  # reporters are clients, and clients are not trusted
                self.bad_reports.warn("bad report", f"ignored the report of {name!r}: {e}")
        gateways.setdefault(self.client.name, self.metrics)
        return dict(sorted(gateways.items()))
