"""The HTTP gateway: POST /generate streams a worker's reply; /health and /stats.

Each gateway process holds one broker Client (one DEALER socket) shared by all
its HTTP requests. A reply's first chunk decides the status: errors before it
become 4xx/5xx with a JSON body; an error after it ends the chunked response
without its terminating chunk, so that the client sees a broken transfer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST

from broker import protocol as p
from broker.client import BrokerError, Client, Stream
from broker.policies import DIRECT
from gateway.metrics import GatewayMetrics

log = logging.getLogger("zroute.gateway")

SERVICE = "generate"
RETRY_AFTER_S = "1"
CLIENT_CLOSED = 499  # the status logged for a client gone before its first line

# Broker error codes, as HTTP statuses.
STATUS_OF_ERROR = {
    p.E_BAD_REQUEST: 400,
    p.E_UNKNOWN_POLICY: 400,
    p.E_NO_SUCH_WORKER: 404,
    p.E_HANDLER: 502,
    p.E_WORKER_LOST: 502,
    p.E_NO_WORKERS: 503,
    p.E_QUEUE_FULL: 503,
    p.E_BROKER_UNREACHABLE: 503,
    p.E_TIMEOUT: 504,
}


@dataclass(frozen=True)
class GatewaySettings:
    broker: str
    routing_mode: str = "round_robin"
    max_body: int = 1 << 20
    request_timeout: float = 60.0


class HttpError(Exception):
    """An error answered with a JSON body `{"error": ...}`."""

    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def json_response(body: dict, status: int = 200, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after or RETRY_AFTER_S)} if status == 503 else None
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def error_response(error: HttpError) -> web.Response:
    body = {"error": error.message}
    if error.code:
        body["code"] = error.code
    return json_response(body, error.status, p.retry_after(error.message))  # the broker's estimate


class ReplyResponse(web.StreamResponse):
    """A chunked response whose headers leave with its first chunk, in one write,
    as web.Response's do, rather than in a write of their own at prepare()."""

    _send_headers_immediately = False


class Gateway:
    """Which policies are valid is the broker's to say: it answers unknown_policy."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.client = Client(settings.broker, timeout=settings.request_timeout)
        self.metrics = GatewayMetrics()

        # path -> (method, handler). A dict lookup: aiohttp's router costs about 10% of
        # the gateway's CPU per request.
        self.routes = {
            "/generate": ("POST", self.generate),
            "/health": ("GET", self.health),
            "/stats": ("GET", self.stats),
            "/metrics": ("GET", self.prometheus),
        }

    def server(self) -> web.Server:
        """aiohttp's low-level server, with this gateway as its only handler."""
        return web.Server(self.handle, request_factory=self._make_request,
                          handler_cancellation=True, access_log=None)

    def _make_request(self, message: RawRequestMessage, payload: StreamReader,
                      protocol: RequestHandler, writer: AbstractStreamWriter,
                      task: asyncio.Task) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, task.get_loop(),
                               client_max_size=self.settings.max_body)

    async def start(self) -> None:
        self.client.connect()

    async def stop(self) -> None:
        await self.client.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        route = self.routes.get(request.path)
        if route is None:
            return error_response(HttpError(404, f"no such path {request.path!r}; "
                                                 "the paths are " + ", ".join(self.routes)))
        method, handler = route
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            response = error_response(HttpError(405, f"{request.path} takes {method}, "
                                                     f"not {request.method}"))
            response.headers["Allow"] = "GET, HEAD" if method == "GET" else method
            return response
        expect = request.headers.get("Expect")
        if expect is not None:  # answered by aiohttp's router, not by its low-level server
            if expect.lower() != "100-continue":
                return error_response(HttpError(417, f"Expect: {expect} is not supported "
                                                     "(only 100-continue is)"))
            if request.version >= (1, 1):  # HTTP/1.0 has no interim responses
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await handler(request)

    # --- /generate -----------------------------------------------------------

    async def generate(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        try:
            body = await self._read_body(request)
            policy, worker = self._routing(request)
        except HttpError as e:
            # A name the broker has not judged is no label: a label per bad value would
            # grow the metrics without bound. The default was judged when the broker started.
            policy = "-" if "routing" in request.query else self.settings.routing_mode
            self._done(b"-", policy, "", e.status, started, None, 0, e.message)
            return error_response(e)
        stream = self.client.request(SERVICE, body, policy=policy, worker=worker)
        self.metrics.inflight += 1
        try:
            return await self._stream(request, stream, policy, started)
        finally:
            self.metrics.inflight -= 1
            stream.cancel()  # no-op once the reply is complete

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpError(413, f"body is larger than {self.settings.max_body} bytes") from None
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise HttpError(400, f"body is not valid JSON: {e}") from None
        text = parsed.get("text") if isinstance(parsed, dict) else None
        if not isinstance(text, str):
            raise HttpError(400, 'body must be a JSON object with a string field "text"')
        if not any(word.strip() for word in text.split(",")):
            raise HttpError(400, '"text" has no words: give comma-separated words, e.g. "a,b"')
        return body

    def _routing(self, request: web.BaseRequest) -> tuple[str, str]:
        worker = request.query.get("worker", "")
        policy = request.query.get("routing") or (DIRECT if worker else self.settings.routing_mode)
        if policy == DIRECT and not worker:
            raise HttpError(400, "routing=direct needs ?worker=<worker id>")
        if worker and policy != DIRECT:
            raise HttpError(400, f"?worker= routes directly; it cannot be combined with "
                                 f"routing={policy}")
        if not self.client.broker_alive:
            raise HttpError(503, "the broker is unreachable", p.E_BROKER_UNREACHABLE)
        return policy, worker

    async def _stream(self, request: web.BaseRequest, stream: Stream, policy: str,
                      started: float) -> web.StreamResponse:
        try:
            await stream.first()
        except BrokerError as e:
            status = STATUS_OF_ERROR.get(e.code, 502)
            if e.code == p.E_UNKNOWN_POLICY:
                policy = "invalid"  # a label per bad value would grow the metrics without bound
            self._done(stream.rid, policy, "", status, started, None, 0, e.code)
            return error_response(HttpError(status, e.message, e.code))
        except asyncio.CancelledError:
            # Gone before the first line: 499, as nginx logs it ("client closed request").
            self.metrics.disconnects += 1
            self._done(stream.rid, policy, "", CLIENT_CLOSED, started, None, 0,
                       "client disconnected")
            raise
        first_chunk = time.monotonic()
        response = ReplyResponse(headers={
            "Content-Type": "text/plain; charset=utf-8",
            "X-Worker-Id": stream.worker_id or "",
        })
        if request.version >= (1, 1):
            response.enable_chunked_encoding()
        # else HTTP/1.0, which has no chunks: the body ends when the connection closes.
        chunks = 0
        try:
            await response.prepare(request)
            while True:
                batch = await stream.batch()
                chunks += len(batch)
                if stream.complete:
                    # The last chunks, the terminating chunk (and, for a reply that
                    # came at once, the headers) leave in one write.
                    await response.write_eof(b"".join(batch))
                    break
                await response.write(b"".join(batch))
        except BrokerError as e:
            self.metrics.incomplete += 1
            try:
                await response.write(f"\nerror: {e.code}: {e.message}\n".encode())
            except ConnectionResetError:
                pass  # the client is gone too; there is nobody left to tell
            # Close without the terminating chunk: the transfer reads as incomplete.
            if request.transport is not None:
                request.transport.close()
            self._done(stream.rid, policy, stream.worker_id, 200, started, first_chunk,
                       chunks, e.code)
            return response
        except (asyncio.CancelledError, ConnectionResetError) as e:
            # The HTTP client went away; the caller's cancel() stops the worker's work.
            self.metrics.disconnects += 1
            self._done(stream.rid, policy, stream.worker_id, 200, started, first_chunk,
                       chunks, "client disconnected")
            if isinstance(e, asyncio.CancelledError):
                raise
            return response  # raised, a reset would be logged by aiohttp as a 500
        self._done(stream.rid, policy, stream.worker_id, 200, started, first_chunk,
                   chunks)
        return response

    def _done(self, rid: bytes, policy: str, worker: str | None, status: int, started: float,
              first_chunk: float | None, chunks: int, error: str = "") -> None:
        """Count the request in the metrics and write its log line."""
        duration = time.monotonic() - started
        ttfc = None if first_chunk is None else first_chunk - started
        worker = worker or ""
        self.metrics.observe(status, policy, worker, duration, ttfc)
        if log.isEnabledFor(logging.INFO):  # the arguments cost more than a skipped call
            log.info("request=%s policy=%s worker=%s status=%d ttfc=%s duration=%.4fs "
                     "chunks=%d%s", rid.decode(), policy, worker or "-", status,
                     "-" if ttfc is None else f"{ttfc:.4f}s", duration, chunks,
                     f" error={error!r}" if error else "")

    # --- /health and /stats ------------------------------------------------

    async def _broker_stats(self) -> dict:
        if not self.client.broker_alive:
            raise HttpError(503, "the broker is unreachable", p.E_BROKER_UNREACHABLE)
        try:
            return await self.client.stats(timeout=2.0)
        except BrokerError as e:
            raise HttpError(503, e.message, e.code) from None

    async def health(self, _: web.BaseRequest) -> web.Response:
        try:
            stats = await self._broker_stats()
        except HttpError as e:
            return json_response({"status": "unavailable", "workers": 0, "error": e.message}, 503)
        workers = stats["broker"]["workers_ready"]  # the list of workers may be truncated
        if workers:
            return json_response({"status": "ok", "workers": workers})
        return json_response({"status": "unavailable", "workers": 0,
                              "error": "no worker is registered"}, 503)

    async def stats(self, _: web.BaseRequest) -> web.Response:
        try:
            stats = await self._broker_stats()
        except HttpError as e:
            return error_response(e)
        stats["gateway"] = self.metrics.summary()
        return json_response(stats)

    async def prometheus(self, _: web.BaseRequest) -> web.Response:
        try:
            broker_stats = await self._broker_stats()
        except HttpError:
            broker_stats = None  # the gateway's own metrics are still worth a scrape
        return web.Response(body=self.metrics.render(broker_stats),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
