"""The gateway's routes: Call routes (a function run in the gateway process) streamed,
failed, cut and counted as Forward routes are; the paths a route may not take.

The gateway runs in the test's process on a real socket, with a real `zroute broker`
(and a worker, where a Call's function sends requests of its own)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import subprocess
import sys
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.routes import Call, Forward
from tests.handlers import CANCELLED_LINE, STARTED_LINE
from tests.http_support import async_test, handler_worker
from tests.support import Stack, async_wait_until, child_env, free_port
from zroute import protocol as p
from zroute.client import BrokerError
from zroute.errors import BadRequest, StartFailed
from zroute_cli.config import load_config
from zroute_cli.gateway import serve

pytestmark = pytest.mark.timeout(30)

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
SECRET = "password=hunter2 in /srv/app/config.py"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A broker and worker-1, serving tests/handlers.py's `hang` as "generate"."""
    stack = Stack(tmp_path_factory.mktemp("routes"))
    stack.broker()
    worker = handler_worker(stack, "worker-1", "hang")
    stack.wait_workers("worker-1")
    yield stack, worker
    stack.close()


def make_gateway(broker_endpoint: str, routes: dict | None = None, *overrides: str,
                 **hooks: Any) -> Gateway:
    config = load_config(overrides=[f"Broker.frontend={broker_endpoint}",
                                    "Broker.heartbeat_interval=0.2", *overrides])
    frontend = dataclasses.replace(config.frontend, max_connections=100)
    return Gateway(frontend, config.broker.for_clients(), "gateway-t", routes=routes, **hooks)


@contextlib.asynccontextmanager
async def serving(broker, routes: dict | None, *overrides: str) -> AsyncIterator[tuple]:
    """The gateway with `routes` on a free port: (gateway, its URL, an HTTP session)."""
    stack, _ = broker
    gateway = make_gateway(stack.frontend, routes, *overrides)
    await gateway.start()
    runner = web.ServerRunner(gateway.server())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            yield gateway, f"http://127.0.0.1:{port}", session
    finally:
        await runner.cleanup()
        await gateway.stop()


class Steps:
    """A Call's function whose chunks the test releases one at a time; it records
    what it received and whether its `finally` ran."""

    def __init__(self, *chunks: str | bytes) -> None:
        self.chunks = chunks
        self.release = asyncio.Semaphore(0)
        self.received: list[Any] = []
        self.finished = asyncio.Event()

    async def __call__(self, body: Any) -> AsyncIterator[str | bytes]:
        self.received.append(body)
        try:
            for chunk in self.chunks:
                await self.release.acquire()
                yield chunk
        finally:
            self.finished.set()

    def free(self, count: int = 1) -> None:
        for _ in range(count):
            self.release.release()


async def fails(error: Exception, after: tuple[str, ...] = ()) -> AsyncIterator[str]:
    for chunk in after:
        yield chunk
    raise error


def failing(error: Exception, *after: str) -> Call:
    return Call(lambda body: fails(error, after))


# --- streaming ------------------------------------------------------------------------


@async_test
async def test_a_call_route_streams_each_chunk_as_it_is_yielded(broker):
    steps = Steps("one\n", b"two\n")
    async with serving(broker, {"/steps": Call(steps)}) as (_, url, session):
        steps.free()  # the status waits for the first chunk
        async with session.post(f"{url}/steps", data=b'[1, {"a": null}]') as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert (resp.headers["Cache-Control"], resp.headers["X-Accel-Buffering"]) == (
                "no-cache", "no")
            assert "X-Worker-Id" not in resp.headers
            assert await resp.content.readline() == b"one\n"  # before "two" is yielded
            steps.free()
            assert await resp.read() == b"two\n"
    assert steps.received == [[1, {"a": None}]]  # any JSON value, decoded
    assert steps.finished.is_set()


@pytest.mark.parametrize("accept, expected", [
    ("", b"a\nb"),
    (SSE, b"data: a\ndata:\n\ndata: b\n\nevent: end\ndata:\n\n"),
    (NDJSON, b'{"chunk":"a\\n"}\n{"chunk":"b"}\n{"done":true}\n'),
], ids=["plain", "sse", "ndjson"])
@async_test
async def test_a_call_route_speaks_each_format(broker, accept, expected):
    async def two(body: Any) -> AsyncIterator[str]:
        yield "a\n"
        yield "b"

    async with serving(broker, {"/two": Call(two)}) as (_, url, session):
        async with session.post(f"{url}/two", data=b"{}", headers={"Accept": accept}) as resp:
            assert resp.status == 200
            assert await resp.read() == expected


@async_test
async def test_a_call_route_sends_a_value_that_is_not_text_as_its_json(broker, caplog):
    async def values(body: Any) -> AsyncIterator[Any]:
        yield {"a": [1, 2.5, True, None]}
        yield 7

    routes = {"/values": Call(values), "/set": Call(lambda body: fails(ValueError(), ({1},)))}
    async with serving(broker, routes) as (_, url, session):
        async with session.post(f"{url}/values", data=b"{}", headers={"Accept": NDJSON}) as resp:
            assert await resp.read() == (b'{"chunk":"{\\"a\\":[1,2.5,true,null]}"}\n'
                                         b'{"chunk":"7"}\n{"done":true}\n')
        async with session.post(f"{url}/set", data=b"{}") as resp:
            assert (resp.status, (await resp.json())["code"]) == (502, p.E_HANDLER)
    assert "the route /set yielded a set, which is not str, bytes or a value JSON" in caplog.text


@async_test
async def test_forward_routes_go_to_the_service_they_name(broker):
    routes = {"/hang": Forward("generate"), "/missing": Forward("no-such-service")}
    async with serving(broker, routes) as (_, url, session):
        async with session.post(f"{url}/hang", data=b'{"marker": "forwarded"}') as resp:
            assert resp.status == 200 and resp.headers["X-Worker-Id"] == "worker-1"
            assert await resp.content.readline() == b"first\n"
        async with session.post(f"{url}/generate", data=b"{}") as resp:
            assert resp.status == 404  # not a route any more
            assert "/hang, /missing" in (await resp.json())["error"]


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("route, status, code, text", [
    (failing(BadRequest("give me a list")), 400, p.E_BAD_REQUEST, "give me a list"),
    (failing(BrokerError(p.E_NO_WORKERS, "nobody home")), 503, p.E_NO_WORKERS, "nobody home"),
    (failing(BrokerError(p.E_TIMEOUT, "too slow")), 504, p.E_TIMEOUT, "too slow"),
    (failing(ValueError(SECRET)), 502, p.E_HANDLER, "the handler of /r failed on request=c1"),
    (Call(lambda body: 42), 502, p.E_HANDLER, "the handler of /r failed"),
], ids=["bad-request", "broker-error", "timeout", "exception", "not-an-iterator"])
@async_test
async def test_an_error_before_the_first_chunk_is_a_json_error(broker, caplog, route, status,
                                                               code, text):
    async with serving(broker, {"/r": route}) as (_, url, session):
        async with session.post(f"{url}/r", data=b"{}") as resp:
            assert resp.status == status
            error = await resp.json()
    assert error["code"] == code and text in error["error"], error
    assert SECRET not in error["error"]
    if code == p.E_HANDLER:  # the gateway's log has the details, under the request id
        assert "route /r failed on request=c1" in caplog.text and "Traceback" in caplog.text


@async_test
async def test_with_expose_errors_the_client_gets_the_exception_text(broker):
    routes = {"/r": failing(ValueError(SECRET)), "/coroutine": Call(asyncio.sleep)}
    async with serving(broker, routes, "Frontend.expose_errors=true") as (_, url, session):
        async with session.post(f"{url}/r", data=b"{}") as resp:
            assert (resp.status, await resp.json()) == (
                502, {"error": f"ValueError: {SECRET}", "code": p.E_HANDLER})
        async with session.post(f"{url}/coroutine", data=b"1") as resp:
            assert "make it an async generator" in (await resp.json())["error"]


@async_test
async def test_a_body_that_is_not_json_is_refused_before_the_function_runs(broker):
    steps = Steps()
    async with serving(broker, {"/r": Call(steps)}) as (_, url, session):
        async with session.post(f"{url}/r", data=b"not json") as resp:
            assert resp.status == 400 and (await resp.json())["code"] == p.E_BAD_REQUEST
    assert steps.received == []


@async_test
async def test_an_error_after_the_first_chunk_ends_the_stream_visibly(broker):
    route = {"/r": failing(ValueError(SECRET), "partial\n")}
    async with serving(broker, route) as (gateway, url, session):
        async with session.post(f"{url}/r", data=b"{}", headers={"Accept": NDJSON}) as resp:
            lines = [json.loads(line) for line in (await resp.read()).splitlines()]
        assert lines[0] == {"chunk": "partial\n"}
        assert lines[1]["code"] == p.E_HANDLER and SECRET not in lines[1]["error"]
        assert len(lines) == 2  # no {"done": true}
        async with session.post(f"{url}/r", data=b"{}") as resp:
            body = b""
            with pytest.raises(aiohttp.ClientPayloadError):  # plain text: cut short
                async for data in resp.content.iter_any():
                    body += data
        assert body.startswith(b"partial\n\nerror: handler_error: ")
        assert gateway.metrics.incomplete == 2


# --- cancelling the function ----------------------------------------------------------


@async_test
async def test_a_client_that_goes_away_cancels_the_function_and_its_requests(broker):
    """The function's own request to a worker is cancelled with it: the worker's
    handler is told."""
    _, worker = broker
    box: dict[str, Gateway] = {}
    finished = asyncio.Event()

    async def relay(body: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in box["gateway"].client.request("generate", body):
                yield chunk
        finally:
            finished.set()

    async with serving(broker, {"/relay": Call(relay)}) as (gateway, url, session):
        box["gateway"] = gateway
        resp = await session.post(f"{url}/relay", data=b'{"marker": "relayed"}')
        assert await resp.content.readline() == b"first\n"
        assert STARTED_LINE.format(marker="relayed") in worker.output()
        resp.close()  # the client goes away
        await asyncio.wait_for(finished.wait(), 5)
        await async_wait_until(lambda: CANCELLED_LINE.format(marker="relayed")
                               in worker.output(), 5, "the worker's handler to be cancelled")
        await async_wait_until(lambda: gateway.metrics.inflight == 0, 5, "no request in flight")
        assert gateway.metrics.disconnects == 1 and not gateway.calls


@async_test
async def test_request_timeout_ends_a_function_that_yields_nothing(broker):
    steps = Steps("never\n")
    async with serving(broker, {"/slow": Call(steps)},
                       "Frontend.request_timeout=0.2") as (_, url, session):
        async with session.post(f"{url}/slow", data=b"{}") as resp:
            assert resp.status == 504
            error = await resp.json()
    assert error == {"code": p.E_TIMEOUT,
                     "error": "no reply within Frontend.request_timeout (0.2 s)"}
    assert steps.finished.is_set()


@async_test
async def test_the_drain_cuts_a_call_stream_and_closes_its_function(broker):
    steps = Steps("one\n", "two\n")
    async with serving(broker, {"/steps": Call(steps)}) as (gateway, url, session):
        steps.free()
        async with session.post(f"{url}/steps", data=b"{}", headers={"Accept": SSE}) as resp:
            assert await resp.content.readline() == b"data: one\n"
            gateway.cut_streams()  # as the end of Frontend.drain_timeout does
            rest = await resp.read()
    assert rest.endswith(b'event: error\ndata: {"error":"the gateway stopped before the '
                         b'reply finished","code":"gateway_stopping"}\n\n')
    assert steps.finished.is_set()


# --- counting -------------------------------------------------------------------------


@async_test
async def test_call_routes_count_in_stats_metrics_and_the_log_under_their_path(broker, caplog):
    caplog.set_level(logging.INFO, "zroute.gateway")
    routes = {"/ok": Call(Steps()), "/bad": failing(BadRequest("no"))}
    async with serving(broker, routes) as (gateway, url, session):
        for path in ("/ok", "/ok", "/bad"):
            async with session.post(f"{url}{path}", data=b"{}") as resp:
                await resp.read()

        async def counted() -> dict | None:
            async with session.get(f"{url}/stats") as resp:
                stats = await resp.json()
            mine = stats["gateways"].get("gateway-t", {})
            return mine if mine.get("requests") == 3 else None

        summary = await async_wait_until(counted, 5, "/stats to count 3 requests")
        assert summary["requests_by_status"] == {"200": 2, "400": 1}
        async with session.get(f"{url}/metrics") as resp:
            page = await resp.text()
    samples = [s for family in text_string_to_metric_families(page) for s in family.samples]
    requests = {(s.labels["status"], s.labels["policy"], s.labels["worker"], s.labels["path"]):
                s.value for s in samples
                if s.name == "zroute_http_requests_total" and s.labels["gateway"] == "gateway-t"}
    assert requests == {("200", "-", "", "/ok"): 2, ("400", "-", "", "/bad"): 1}
    durations = [s.value for s in samples
                 if s.name == "zroute_http_time_to_first_chunk_seconds_count"
                 and s.labels["gateway"] == "gateway-t"]
    assert durations == [2]  # the refused one had no first chunk
    logged = [record.fields for record in caplog.records if hasattr(record, "fields")]
    assert [(line["path"], line["request"], line["status"]) for line in logged] == [
        ("/ok", "c1", 200), ("/ok", "c2", 200), ("/bad", "c3", 400)]


# --- paths and methods ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/stats", "/stats/stream", "/metrics",
                                  "/dashboard"])
def test_a_route_on_an_operators_path_is_refused(path):
    with pytest.raises(ValueError) as refused:
        make_gateway("tcp://127.0.0.1:1", {path: Call(Steps())})
    message = str(refused.value)
    assert path in message and "\n" not in message


@pytest.mark.parametrize("routes, words", [
    ({"generate": Forward("generate")}, "must be a string that starts with /"),
    ({"/x": Forward("generate", "FETCH")}, "method 'FETCH'"),
    ({"/x": Forward("")}, "is not a name"),
    ({"/x": Call("not callable")}, "is not callable"),
    ({"/x": [Call(print), Call(print)]}, "route /x has two routes for one method"),
    ({"/x": "generate"}, "not Forward or Call"),
])
def test_a_route_the_gateway_cannot_serve_is_refused(routes, words):
    with pytest.raises(ValueError, match=words):
        make_gateway("tcp://127.0.0.1:1", routes)


def test_with_no_routes_the_gateway_serves_generate_as_before():
    gateway = make_gateway("tcp://127.0.0.1:1")
    assert list(gateway.routes) == ["/generate", "/health", "/stats", "/stats/stream",
                                    "/metrics", "/dashboard"]


@async_test
async def test_each_route_takes_its_method_and_unknown_paths_list_the_routes(broker):
    steps = Steps("status\n")
    routes = {"/status": Call(steps, method="GET"), "/steps": Call(Steps())}
    async with serving(broker, routes) as (_, url, session):
        async with session.post(f"{url}/status", data=b"{}") as resp:
            assert (resp.status, resp.headers["Allow"]) == (405, "GET, HEAD")
            assert (await resp.json())["code"] == "method_not_allowed"
        async with session.get(f"{url}/steps") as resp:
            assert (resp.status, resp.headers["Allow"]) == (405, "POST")
        steps.free()
        async with session.get(f"{url}/status") as resp:  # no query: {}
            assert (resp.status, await resp.read()) == (200, b"status\n")
        async with session.get(f"{url}/nowhere") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"].startswith(
                "no such path '/nowhere'; the paths are /status, /steps, /health, /stats")
    assert steps.received == [{}]


@async_test
async def test_a_get_route_receives_the_query_and_shares_its_path_with_a_post_route(broker):
    async def query(received: Any) -> AsyncIterator[Any]:
        yield {"got": received}

    async def body(received: Any) -> AsyncIterator[Any]:
        yield {"posted": received}

    routes = {"/items": [Call(query, method="GET"), Call(body)]}
    async with serving(broker, routes) as (_, url, session):
        async with session.get(f"{url}/items?a=1&b=x%20y&empty=") as resp:
            assert (resp.status, await resp.json(content_type=None)) == (
                200, {"got": {"a": "1", "b": "x y", "empty": ""}})
        async with session.post(f"{url}/items", data=b"[1]") as resp:
            assert await resp.json(content_type=None) == {"posted": [1]}
        async with session.delete(f"{url}/items") as resp:
            assert (resp.status, resp.headers["Allow"]) == (405, "GET, POST, HEAD")
            assert (await resp.json())["error"] == "/items takes GET, POST, HEAD, not DELETE"
        async with session.get(f"{url}/items?a=1&a=2") as resp:
            assert (resp.status, await resp.json()) == (400, {
                "error": "the query gives 'a' more than once: give each parameter once",
                "code": p.E_BAD_REQUEST})
        async with session.get(f"{url}/items", data=b'{"a": 1}') as resp:
            assert (resp.status, (await resp.json())["error"]) == (
                400, "GET /items takes its parameters from the query string, not a body")
        async with session.post(f"{url}/items", data=b"not json") as resp:
            error = (await resp.json())["error"]
            assert error.endswith(": send a JSON value with Content-Type: application/json")
            assert "text" not in error


# --- starting and stopping ------------------------------------------------------------


@async_test
async def test_on_start_and_on_stop_run_around_serving(broker):
    stack, _ = broker
    events = []

    async def on_start() -> None:
        events.append(("start", (await gateway.client.stats(timeout=5))["broker"]["boot_id"]))

    async def on_stop() -> None:
        events.append(("stop", gateway.client.broker_alive))

    gateway = make_gateway(stack.frontend, None, on_start=on_start, on_stop=on_stop)
    await gateway.start()
    assert [event for event, _ in events] == ["start"]  # the client could reach the broker
    await gateway.stop()
    assert events[1] == ("stop", True)  # the client was still open


@async_test
async def test_a_failing_on_start_stops_the_gateway_before_it_listens(broker):
    stack, _ = broker

    async def on_start() -> None:
        raise RuntimeError("no model\nfile here")

    gateway = make_gateway(stack.frontend, None, on_start=on_start)
    port = free_port()
    with pytest.raises(StartFailed) as failed:
        await serve(gateway, "127.0.0.1", port, drain_timeout=1)
    assert str(failed.value) == "the gateway's on_start failed: RuntimeError: no model file here"
    with pytest.raises(OSError):  # it never listened
        await asyncio.open_connection("127.0.0.1", port)


FAILING_START = """
import argparse
from gateway.app import Gateway
from zroute.settings import BrokerSettings, FrontendSettings
from zroute_cli import aio
from zroute_cli.command import add_common_options, run_command
from zroute_cli.gateway import serve

async def on_start():
    raise RuntimeError("no model here")

def run(args, overrides):
    gateway = Gateway(FrontendSettings(max_connections=10), BrokerSettings().for_clients(),
                      on_start=on_start)
    aio.run(serve(gateway, "127.0.0.1", PORT, 1.0))
    return 0

parser = argparse.ArgumentParser(prog="zroute gateway")
add_common_options(parser)
parser.set_defaults(run=run, process_name="gateway")
raise SystemExit(run_command(parser, []))
"""


def test_a_failing_on_start_ends_the_command_with_one_line_and_exit_code_3():
    script = FAILING_START.replace("PORT", str(free_port()))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=20, env=child_env())
    assert result.returncode == 3, result.stderr  # START_FAILED: serve restarts none
    assert result.stderr.splitlines()[-1] == (
        "zroute gateway: error: the gateway's on_start failed: RuntimeError: no model here")
    assert "Traceback" not in result.stderr and "listening" not in result.stderr
