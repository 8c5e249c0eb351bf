"""The HTTP gateway, end to end: real `zroute broker`, `zroute worker` and `zroute gateway`
processes on free ports, a real aiohttp client, and curl where it is installed."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections import Counter
from types import SimpleNamespace

import aiohttp
import pytest
import zmq

from zroute import protocol as p
from gateway.app import Gateway
from tests.handlers import FAILURE
from tests.http_support import (CURL, SEED_OUTPUT, SEED_TEXT, async_test, curl, get_json,
                                handler_worker, http, parse_curl, raw_http, start_curl,
                                start_gateway, wait_healthy)
from tests.support import Stack, free_port, wait_until, workers_by_id
from zroute_cli.config import load_config

pytestmark = pytest.mark.timeout(30)

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
SEED_BODY = b'{"text": "world,universe,galaxy"}'


def no_traceback(proc) -> None:
    output = proc.output()
    assert "Traceback" not in output, output


async def post(session: aiohttp.ClientSession, url: str, body: bytes = SEED_BODY,
               timeout: aiohttp.ClientTimeout | None = None,
               **params: str) -> tuple[int, dict, bytes]:
    async with session.post(f"{url}/generate", data=body, params=params, timeout=timeout,
                            headers={"Content-Type": JSON}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def read_lines_until_broken(resp: aiohttp.ClientResponse, lines: list[bytes]) -> None:
    """Read lines into `lines`; an incomplete transfer raises ClientPayloadError at the end."""
    while True:
        line = await resp.content.readline()
        if not line:
            return
        lines.append(line)


def reported(gateway, requests: int) -> dict:
    """The gateway's /stats once they count `requests` requests: /stats shows the counters
    that each gateway reports to the broker every heartbeat (1 s)."""
    return wait_until(lambda: (stats := gateway.stats()) and
                      stats["gateway"]["requests"] == requests and stats, 5,
                      f"/stats to count {requests} request(s)")


@pytest.fixture
def one_worker(stack):
    """Broker, worker-1 (sleep_time 0) and a gateway; healthy."""
    stack.broker()
    stack.worker("worker-1")
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    return gateway


def serving_handler(stack: Stack, handler: str, *worker_args: str, fails: bool = False):
    """Broker, worker-1 serving a handler of tests/handlers.py, and a gateway. A handler
    that `fails` has the worker log its traceback."""
    stack.broker()
    handler_worker(stack, "worker-1", handler, *worker_args).expect(0, traceback=fails)
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    return gateway


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """For tests that only send rejected or read-only requests: one stack for all of them.

    A gateway with the default body limit, and one with --Frontend.max_body=100.
    """
    stack = Stack(tmp_path_factory.mktemp("shared"))
    try:
        stack.broker()
        stack.worker("worker-1")
        gateway = start_gateway(stack)
        small = start_gateway(stack, "--Frontend.max_body=100", name="gateway-small")
        wait_healthy(gateway, 1)
        wait_healthy(small, 1)
        yield SimpleNamespace(stack=stack, gateway=gateway, small=small)
    finally:
        stack.close()


# --- the happy path -------------------------------------------------------------------


@async_test
async def test_generate_streams_the_greetings_chunked_with_the_worker_id(stack, one_worker):
    url = one_worker.url
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/generate", json={"text": SEED_TEXT}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == TEXT
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in resp.headers
            assert resp.headers["X-Worker-Id"] == "worker-1"
            assert resp.headers["Server"] == "zroute"  # aiohttp's would name its version
            assert await resp.text() == SEED_OUTPUT
    requests = 1
    if CURL:
        result = curl(f"{url}/generate", body=SEED_BODY)
        assert (result.returncode, result.status) == (0, 200), result.stderr
        assert result.headers["content-type"] == TEXT
        assert result.headers["transfer-encoding"] == "chunked"
        assert result.headers["x-worker-id"] == "worker-1"
        assert result.body.decode() == SEED_OUTPUT
        # --raw shows the chunked framing: a complete transfer ends with the zero-size chunk.
        raw = curl(f"{url}/generate", "--raw", body=SEED_BODY)
        assert raw.returncode == 0 and raw.body.endswith(b"\r\n0\r\n\r\n"), raw
        requests += 2

    stats = reported(one_worker, requests)
    assert set(stats) == {"broker", "brokers", "workers", "gateway", "gateways"}
    assert stats["gateway"] == {"requests": requests, "requests_by_status": {"200": requests},
                                "inflight": 0, "disconnects": 0, "incomplete": 0}
    assert list(stats["gateways"].values()) == [stats["gateway"]]  # the only gateway
    assert (stats["broker"]["completed"], stats["broker"]["inflight"]) == (requests, 0)
    assert [(w["id"], w["state"], w["completed"]) for w in stats["workers"]] == [
        ("worker-1", "ready", requests)]
    no_traceback(one_worker.proc)


@pytest.mark.timeout(20)
@async_test
async def test_lines_reach_the_client_as_the_worker_yields_them(stack):
    stack.broker()
    stack.worker("worker-1", sleep_time=0.3)
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    expected = SEED_OUTPUT.encode().splitlines(keepends=True)

    async def with_aiohttp() -> list[tuple[float, bytes]]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{gateway.url}/generate", json={"text": SEED_TEXT}) as resp:
                assert resp.status == 200
                arrivals = []
                while line := await resp.content.readline():
                    arrivals.append((time.monotonic(), line))
                return arrivals

    async def with_curl() -> list[tuple[float, bytes]]:
        process = await start_curl(f"{gateway.url}/generate", SEED_BODY)
        arrivals = []
        while line := await process.stdout.readline():
            arrivals.append((time.monotonic(), line))
        assert await process.wait() == 0, await process.stderr.read()
        return arrivals

    clients = [with_aiohttp()] + ([with_curl()] if CURL else [])
    for arrivals in await asyncio.gather(*clients):
        assert [line for _, line in arrivals] == expected
        # 3 words 0.3 s apart: the first line is not held back until the reply is complete.
        assert arrivals[-1][0] - arrivals[0][0] >= 0.4, arrivals


# --- routing ----------------------------------------------------------------------------


@async_test
async def test_round_robin_direct_and_random_routing_through_http(stack):
    stack.broker()
    stack.worker("worker-1")
    stack.worker("worker-2")
    gateway = start_gateway(stack)
    wait_healthy(gateway, 2)

    def completed() -> dict[str, int]:
        stats = get_json(f"{gateway.url}/stats")
        return {wid: w["completed"] for wid, w in workers_by_id(stats).items()}

    async with aiohttp.ClientSession() as session:
        served = Counter()
        for _ in range(20):
            status, headers, body = await post(session, gateway.url)
            assert (status, body.decode()) == (200, SEED_OUTPUT)
            served[headers["X-Worker-Id"]] += 1
        assert served == {"worker-1": 10, "worker-2": 10}
        assert completed() == {"worker-1": 10, "worker-2": 10}

        for _ in range(5):
            status, headers, body = await post(session, gateway.url, worker="worker-2")
            assert (status, headers["X-Worker-Id"], body.decode()) == (200, "worker-2", SEED_OUTPUT)
        if CURL:
            result = curl(f"{gateway.url}/generate?worker=worker-2", body=SEED_BODY)
            assert (result.returncode, result.status, result.headers["x-worker-id"],
                    result.body.decode()) == (0, 200, "worker-2", SEED_OUTPUT)
        direct = 6 if CURL else 5
        assert completed() == {"worker-1": 10, "worker-2": 10 + direct}

        served = Counter()
        for _ in range(10):
            status, headers, body = await post(session, gateway.url, routing="random")
            assert (status, body.decode()) == (200, SEED_OUTPUT)
            served[headers["X-Worker-Id"]] += 1
        assert set(served) <= {"worker-1", "worker-2"}
        assert completed() == {"worker-1": 10 + served["worker-1"],
                               "worker-2": 10 + direct + served["worker-2"]}
    no_traceback(gateway.proc)


# --- rejected requests --------------------------------------------------------------------

BAD_BODY = 'body must be a JSON object with a string field "text"'
OVER_DEFAULT_LIMIT = b'{"text": "' + b"a" * (1 << 20) + b'"}'

BAD_TEXT = {"error": BAD_BODY, "code": "bad_request"}
NO_WORDS = {"error": '"text" has no words: give comma-separated words, e.g. "a,b"',
            "code": "bad_request"}
# The cases the gateway passes on: the greeting handler, or the broker, refuses them.
REACH_THE_BROKER = {"body-not-an-object", "text-missing", "text-not-a-string", "text-null",
                    "text-without-words", "plain-string-without-words", "unknown-worker",
                    "unknown-routing-mode"}

REJECTED = {
    # case: (gateway, query, body, status, exact JSON body or a prefix of its error text)
    "body-not-json": ("gateway", "", b"hello", 400, "body is not valid JSON ("),
    "body-form-encoded": ("gateway", "", b"text=a,b", 400, "body is not valid JSON ("),
    "body-not-an-object": ("gateway", "", b'["a,b"]', 400, BAD_TEXT),
    "text-missing": ("gateway", "", b'{"words": "a,b"}', 400, BAD_TEXT),
    "text-not-a-string": ("gateway", "", b'{"text": ["a", "b"]}', 400, BAD_TEXT),
    "text-null": ("gateway", "", b'{"text": null}', 400, BAD_TEXT),
    "text-without-words": ("gateway", "", b'{"text": " , ,"}', 400, NO_WORDS),
    "plain-string-without-words": ("gateway", "", b'" , "', 400, NO_WORDS),
    "body-over-default-limit": ("gateway", "", OVER_DEFAULT_LIMIT, 413, {
        "error": "body is larger than Frontend.max_body (1048576 bytes)",
        "code": "body_too_large"}),
    "body-over-max_body-100": ("small", "", b'{"text": "world"}'.ljust(101), 413, {
        "error": "body is larger than Frontend.max_body (100 bytes)", "code": "body_too_large"}),
    "unknown-worker": ("gateway", "?worker=nobody", SEED_BODY, 404, {
        "error": "no such worker: 'nobody' serves no 'generate' requests "
                 "(workers of 'generate': worker-1)",
        "code": "no_such_worker"}),
    "unknown-routing-mode": ("gateway", "?routing=nope", SEED_BODY, 400, {
        "error": "unknown routing policy 'nope' "
                 "(valid: round_robin, random, least_loaded, power_of_two, direct)",
        "code": "unknown_policy"}),
    "direct-without-worker": ("gateway", "?routing=direct", SEED_BODY, 400, {
        "error": "routing=direct needs ?worker=<worker id>", "code": "bad_request"}),
    "worker-with-other-routing": ("gateway", "?worker=worker-1&routing=random", SEED_BODY, 400, {
        "error": "?worker= routes directly; it cannot be combined with routing=random",
        "code": "bad_request"}),
    "worker-given-twice": ("gateway", "?worker=worker-1&worker=worker-2", SEED_BODY, 400, {
        "error": "the query gives 'worker' more than once: give each parameter once",
        "code": "bad_request"}),
}


def check_error(status: int, content_type: str, body: bytes, expected_status: int,
                expected: dict | str) -> None:
    assert (status, content_type) == (expected_status, JSON), body
    parsed = json.loads(body)
    if isinstance(expected, str):
        assert list(parsed) == ["error", "code"] and parsed["error"].startswith(expected), parsed
    else:
        assert parsed == expected


@pytest.mark.parametrize("case", list(REJECTED))
@async_test
async def test_rejected_request_gets_its_status_and_a_json_error(shared, case):
    which, query, body, status, expected = REJECTED[case]
    url = getattr(shared, which).url
    before = get_json(f"{url}/stats")["broker"]["requests"]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/generate{query}", data=body,
                                headers={"Content-Type": JSON}) as resp:
            check_error(resp.status, resp.headers["Content-Type"], await resp.read(), status,
                        expected)
            assert "Retry-After" not in resp.headers
    if CURL:
        result = curl(f"{url}/generate{query}", body=body)
        assert result.returncode == 0, result.stderr
        check_error(result.status, result.headers["content-type"], result.body, status, expected)
    reached = (2 if CURL else 1) if case in REACH_THE_BROKER else 0
    assert get_json(f"{url}/stats")["broker"]["requests"] == before + reached
    no_traceback(getattr(shared, which).proc)


WRONG_ROUTES = {
    # case: (method, path, status, error, code, Allow header)
    "unknown-path": ("GET", "/nope", 404,
                     "no such path '/nope'; the paths are /generate, /health, /stats, "
                     "/stats/stream, /metrics, /dashboard",
                     "not_found", None),
    "get-generate": ("GET", "/generate", 405, "/generate takes POST, not GET",
                     "method_not_allowed", "POST"),
    "post-health": ("POST", "/health", 405, "/health takes GET, HEAD, not POST",
                    "method_not_allowed", "GET, HEAD"),
    "delete-stats": ("DELETE", "/stats", 405, "/stats takes GET, HEAD, not DELETE",
                     "method_not_allowed", "GET, HEAD"),
}


@pytest.mark.parametrize("case", list(WRONG_ROUTES))
def test_wrong_path_or_method_gets_a_json_error(shared, case):
    method, path, status, error, code, allow = WRONG_ROUTES[case]
    reply = http(method, f"{shared.gateway.url}{path}", b"{}" if method == "POST" else None)
    check_error(reply.status, reply.headers["content-type"], reply.body, status,
                {"error": error, "code": code})
    assert reply.headers["server"] == "zroute"
    assert reply.headers.get("allow") == allow


@async_test
async def test_expect_100_continue_is_answered_and_other_expectations_get_417(shared):
    async with aiohttp.ClientSession() as session:
        # The client sends the body only after the gateway's 100 Continue.
        async with session.post(f"{shared.gateway.url}/generate", data=SEED_BODY,
                                expect100=True) as resp:
            assert (resp.status, await resp.read()) == (200, SEED_OUTPUT.encode())
        async with session.post(f"{shared.gateway.url}/generate", data=SEED_BODY,
                                headers={"Expect": "magic"}) as resp:
            check_error(resp.status, resp.headers["Content-Type"], await resp.read(), 417,
                        {"error": "Expect: magic is not supported (only 100-continue is)",
                         "code": "expectation_failed"})


@pytest.mark.parametrize("expect", ["", "Expect: 100-continue\r\n"], ids=["plain", "expect"])
def test_an_http_1_0_client_gets_the_body_unchunked_until_the_connection_closes(shared,
                                                                                  expect):
    body = SEED_BODY
    request = (f"POST /generate HTTP/1.0\r\nHost: test\r\n{expect}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    reply = raw_http(shared.gateway.port, request)  # the body ends when the connection closes
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.0 200 OK"
    assert b"transfer-encoding" not in head.lower()
    assert payload == SEED_OUTPUT.encode()


MALFORMED_HTTP = {
    "not-http": (b"GARBAGE\r\n\r\n", "Invalid method encountered"),
    "header-too-large": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 +
                         b"\r\n\r\n", "Got more than 8190 bytes when reading"),
    "bad-content-length": (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: abc"
                           b"\r\n\r\n", "Invalid character in Content-Length"),
    # Smuggling attempts: two ways to say where the body ends.
    "content-length-and-chunked": (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                                   "Transfer-Encoding can't be present with Content-Length"),
    "two-content-lengths": (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                            b"Content-Length: 3\r\n\r\n{}", "Duplicate Content-Length"),
    "transfer-encoding-not-chunked": (b"POST /generate HTTP/1.1\r\nHost: x\r\n"
                                      b"Transfer-Encoding: identity\r\n\r\n",
                                      "Request has invalid `Transfer-Encoding`"),
    "bad-chunk-size": (b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                       b"\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "Invalid character in chunk size"),
    "space-in-header-name": (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
                             "Invalid header token"),
    "nul-in-header-value": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
                            "Invalid header value char"),
    "folded-header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
                      "Unexpected whitespace after header value"),
    "request-line-too-long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                              "Got more than 8190 bytes when reading"),
    "too-many-headers": (b"GET /health HTTP/1.1\r\n" +
                         b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
                         "Too many headers received"),
    "unknown-http-version": (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", "Bad status line"),
    "bare-line-feeds": (b"GET /health HTTP/1.1\nHost: x\n\n", "Bad status line"),
    "http-2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "Pause on PRI/Upgrade"),
    # HTTP/0.9 has no status line to carry an error: the answer is HTTP/1.1.
    "http-0.9": (b"GET /health\r\n\r\n", "HTTP/0.9 is not supported"),
}


@pytest.mark.parametrize("case", list(MALFORMED_HTTP))
def test_a_request_that_is_not_valid_http_gets_a_json_400_too(shared, case):
    request, error = MALFORMED_HTTP[case]
    reply = raw_http(shared.gateway.port, request)  # closed after it
    assert re.match(rb"HTTP/1\.[01] 400 ", reply), reply
    result = parse_curl(0, reply)
    check_error(result.status, result.headers["content-type"], result.body, 400, error)
    assert json.loads(result.body)["code"] == "bad_request"
    assert result.headers["server"] == "zroute"
    no_traceback(shared.gateway.proc)


def test_bad_requests_are_logged_once_per_kind_not_per_request(shared):
    def logged() -> int:
        return shared.gateway.proc.output().count("rejected requests that are not valid HTTP: "
                                                  "Invalid header token")
    before = logged()
    for _ in range(5):
        reply = raw_http(shared.gateway.port, MALFORMED_HTTP["space-in-header-name"][0])
        assert parse_curl(0, reply).status == 400
    assert logged() <= max(before, 1)  # within the limiter's interval (10 s): one line
    no_traceback(shared.gateway.proc)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_does_not_decode_gets_a_json_400_and_one_log_line(shared, encoding):
    request = (f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Encoding: {encoding}\r\n"
               f"Content-Length: 14\r\n\r\n{{\"text\": \"a\"}}").encode()
    def logged() -> int:
        return shared.gateway.proc.output().count("rejected bodies that do not decode")
    before = logged()
    for _ in range(3):
        result = parse_curl(0, raw_http(shared.gateway.port, request))
        check_error(result.status, result.headers["content-type"], result.body, 400,
                    {"error": f"body does not decode: Can not decode content-encoding: "
                              f"{encoding}", "code": "bad_request"})
    assert 1 <= logged() <= before + 1  # within the limiter's interval (10 s): one line
    no_traceback(shared.gateway.proc)


def test_head_on_health_answers_its_status_without_a_body(shared):
    reply = http("HEAD", f"{shared.gateway.url}/health")
    assert (reply.status, reply.headers["content-type"], reply.body) == (200, JSON, b"")


@async_test
async def test_a_plain_json_string_is_the_greetings_text(shared):
    async with aiohttp.ClientSession() as session:
        status, _, reply = await post(session, shared.gateway.url, b'" a, ,b "')
    assert (status, reply) == (200, b"Hello a!\nHello b!\n")


@async_test
async def test_a_custom_handler_receives_any_json_body(stack):
    gateway = serving_handler(stack, "echo")
    async with aiohttp.ClientSession() as session:
        for body in (b'[1, "a"]', b'{"prompt": "hi"}', b'"a,b"', b"42", b"null"):
            status, _, reply = await post(session, gateway.url, body)
            assert (status, json.loads(reply)) == (200, json.loads(body))
    no_traceback(gateway.proc)


@async_test
async def test_a_body_of_exactly_max_body_bytes_is_served(shared):
    body = b'{"text": "world"}'.ljust(100)
    async with aiohttp.ClientSession() as session:
        status, headers, reply = await post(session, shared.small.url, body)
    assert (status, headers["X-Worker-Id"], reply) == (200, "worker-1", b"Hello world!\n")


# --- what peers choose, in headers -----------------------------------------------------

# The protocol refuses ids with control characters (a reply naming one never reaches the
# gateway); a printable one may still be anything but ASCII.
HOSTILE_WORKER_ID = "w\u00f6rker \u2603 X-Injected: 1"


def serve_as_worker(address: str, worker_id: str, stop: threading.Event) -> None:
    """A broker that answers every request "hi" from a worker named `worker_id`, as a
    broker that trusted its workers' ids would: the gateway must not trust it either."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(address)
    try:
        while not stop.is_set():
            if not sock.poll(50):
                continue
            peer, *frames = sock.recv_multipart()
            for message in p.unbatch(frames):
                msg = p.decode_from_client(message)
                if isinstance(msg, p.Heartbeat):
                    reply = p.encode_heartbeat(p.Heartbeat(b"boot"))
                elif isinstance(msg, p.Request):
                    reply = p.encode_reply_to_client(p.End(msg.rid, [b"hi\n"], worker_id))
                else:
                    continue
                sock.send_multipart([peer, *reply])
    finally:
        sock.close()


def test_a_worker_id_that_is_not_ascii_is_escaped_in_x_worker_id(stack):
    address = f"tcp://127.0.0.1:{free_port()}"
    stop = threading.Event()
    broker = threading.Thread(target=serve_as_worker, args=(address, HOSTILE_WORKER_ID, stop))
    broker.start()
    try:
        gateway = start_gateway(stack, broker=address)
        reply = raw_http(gateway.port, b"POST /generate HTTP/1.1\r\nHost: x\r\n"
                                       b"Connection: close\r\nContent-Length: 2\r\n\r\n{}")
    finally:
        stop.set()
        broker.join(5)
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK", reply
    assert b"X-Worker-Id: w%C3%B6rker %E2%98%83 X-Injected: 1" in lines, reply
    assert head.isascii(), reply
    assert body == b"3\r\nhi\n\r\n0\r\n\r\n"
    no_traceback(gateway.proc)


# --- unavailable: no worker, no broker ------------------------------------------------------


@async_test
async def test_health_and_generate_answer_503_until_a_worker_registers(stack):
    stack.broker("--Broker.queue_timeout=0.2")  # the wait for a first worker, kept short
    gateway = start_gateway(stack)
    # (Until the broker has started, the error is that it does not answer.)
    health = wait_until(lambda: (r := http("GET", f"{gateway.url}/health")) and r.json().get(
        "error") == "no worker is registered" and r, 10, "/health to see the broker")
    assert (health.status, health.headers["content-type"], health.json()) == (
        503, JSON, {"status": "unavailable", "workers": 0, "error": "no worker is registered",
                    "code": "no_workers"})
    assert health.headers["retry-after"] == "1"

    no_workers = {"error": "no worker serves 'generate' (waited Broker.queue_timeout: 0.2 s)",
                  "code": "no_workers"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway.url}/generate", json={"text": SEED_TEXT}) as resp:
            check_error(resp.status, resp.headers["Content-Type"], await resp.read(), 503,
                        no_workers)
            assert resp.headers["Retry-After"] == "1"
    if CURL:
        result = curl(f"{gateway.url}/generate", body=SEED_BODY)
        check_error(result.status, result.headers["content-type"], result.body, 503, no_workers)
        assert result.headers["retry-after"] == "1"

    stack.worker("worker-1")
    wait_healthy(gateway, 1)
    health = http("GET", f"{gateway.url}/health")
    assert (health.status, health.headers["content-type"]) == (200, JSON)
    assert health.json() == {"status": "ok", "workers": 1}
    stack.worker("worker-2")
    wait_healthy(gateway, 2)
    reply = http("POST", f"{gateway.url}/generate", SEED_BODY)
    assert (reply.status, reply.body.decode()) == (200, SEED_OUTPUT)


@pytest.mark.timeout(20)
@async_test
async def test_unreachable_broker_gives_503_with_retry_after(stack):
    broker = f"tcp://127.0.0.1:{free_port()}"  # no broker there
    gateway = start_gateway(stack, broker=broker)
    unreachable = {"error": "the broker is unreachable", "code": "broker_unreachable"}

    async def health() -> None:
        async with session.get(f"{gateway.url}/health") as resp:
            assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
            assert await resp.json() == {"status": "unavailable", "workers": 0,
                                         "error": f"no answer from the broker at {broker} "
                                                  "within 2 s",
                                         "code": "broker_unreachable"}

    async def first_request() -> None:
        # Sent within the heartbeat window (3 s), while the broker may still answer: it
        # waits out that window, then fails.
        async with session.post(f"{gateway.url}/generate", json={"text": SEED_TEXT}) as resp:
            assert (resp.status, resp.headers["Content-Type"]) == (503, JSON)
            # (On a slow machine the window may be over already: then it is refused at once.)
            assert await resp.json() in [unreachable, {
                "error": f"no answer from the broker at {broker}", "code": "broker_unreachable"}]
            assert resp.headers["Retry-After"] == "1"

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(first_request(), health())
        started = time.monotonic()
        async with session.post(f"{gateway.url}/generate", json={"text": SEED_TEXT}) as resp:
            check_error(resp.status, resp.headers["Content-Type"], await resp.read(), 503,
                        unreachable)
            assert resp.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 1.0  # known dead: answered at once
    if CURL:
        result = curl(f"{gateway.url}/generate", body=SEED_BODY)
        check_error(result.status, result.headers["content-type"], result.body, 503, unreachable)
        assert result.headers["retry-after"] == "1"
    no_traceback(gateway.proc)



@async_test
async def test_a_gateway_over_the_brokers_per_client_limit_answers_503_with_retry_after(stack):
    # Every HTTP user of a gateway is the one broker client: the limit holds for them all.
    stack.broker("--Broker.max_requests_per_client=1")
    stack.worker("worker-1", sleep_time=0.5)
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway.url}/generate", json={"text": "a,b,c"}) as first:
            assert first.status == 200
            async with session.post(f"{gateway.url}/generate", json={"text": "a"}) as resp:
                check_error(resp.status, resp.headers["Content-Type"], await resp.read(), 503,
                            "this client has 1 requests in flight")
                assert resp.headers["Retry-After"] == "1"
                assert json.loads(await resp.read())["code"] == "limit_exceeded"
            assert await first.text() == "Hello a!\nHello b!\nHello c!\n"
    no_traceback(gateway.proc)


@async_test
async def test_a_client_gone_before_the_broker_answered_is_not_labelled_with_its_routing(stack):
    broker = stack.broker()
    stack.worker("worker-1")
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    broker.signal(signal.SIGSTOP)  # the request reaches no broker that could judge it
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                await post(session, gateway.url, routing="no-such-policy-1234",
                           timeout=aiohttp.ClientTimeout(total=0.5))
    finally:
        broker.signal(signal.SIGCONT)

    def requests_metrics() -> list | None:
        reply = http("GET", f"{gateway.url}/metrics")
        text = reply.body.decode() if reply and reply.status == 200 else ""
        return [line for line in text.splitlines()
                if line.startswith("zroute_http_requests_total{")] or None

    lines = wait_until(requests_metrics, 10, "/metrics to count the request")
    assert len(lines) == 1 and 'status="499"' in lines[0] and 'policy="-"' in lines[0], lines
    no_traceback(gateway.proc)

# --- failures after the response began --------------------------------------------------------


def test_a_handler_failing_before_its_first_line_answers_502_handler_error(stack):
    gateway = serving_handler(stack, "fail_at_once", "--Backend.expose_errors=true", fails=True)
    reply = http("POST", f"{gateway.url}/generate", SEED_BODY)
    check_error(reply.status, reply.headers["content-type"], reply.body, 502,
                {"error": f"RuntimeError: {FAILURE}", "code": "handler_error"})
    no_traceback(gateway.proc)


@async_test
async def test_a_handler_failing_mid_stream_gives_a_visibly_incomplete_response(stack):
    gateway = serving_handler(stack, "fail_mid_stream", "--Backend.expose_errors=true",
                              fails=True)
    expected = f"Hello world!\n\nerror: handler_error: RuntimeError: {FAILURE}\n"

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway.url}/generate", json={"text": "a,b"}) as resp:
            assert (resp.status, resp.headers["X-Worker-Id"]) == (200, "worker-1")
            lines: list[bytes] = []
            with pytest.raises(aiohttp.ClientPayloadError):
                await read_lines_until_broken(resp, lines)
    assert b"".join(lines).decode() == expected
    requests = 1
    if CURL:
        result = curl(f"{gateway.url}/generate", body=b'{"text": "a,b"}')
        assert (result.returncode, result.status) == (18, 200), result  # 18: partial file
        assert result.body.decode() == expected
        requests += 1

    stats = reported(gateway, requests)
    assert stats["gateway"]["incomplete"] == requests
    assert stats["gateway"]["requests_by_status"] == {"200": requests}
    assert workers_by_id(stats)["worker-1"]["failed"] == requests
    no_traceback(gateway.proc)


@async_test
async def test_a_worker_killed_mid_stream_gives_a_visibly_incomplete_response(stack):
    stack.broker()
    worker = stack.worker("worker-1", sleep_time=0.5)
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    body = b'{"text": "a,b,c,d"}'
    greetings = ["Hello a!\n", "Hello b!\n", "Hello c!\n", "Hello d!\n"]
    lost = "\nerror: worker_lost: worker 'worker-1' was lost mid-request\n"

    async with aiohttp.ClientSession() as session:
        # Both clients' requests are in flight at once; each reads one line, then the kill.
        curl_process = await start_curl(f"{gateway.url}/generate", body) if CURL else None
        async with session.post(f"{gateway.url}/generate", data=body,
                                headers={"Content-Type": JSON}) as resp:
            assert (resp.status, resp.headers["X-Worker-Id"]) == (200, "worker-1")
            lines = [await resp.content.readline()]
            curl_lines = [await curl_process.stdout.readline()] if curl_process else []
            worker.kill()  # no drain, no goodbye
            killed = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                await read_lines_until_broken(resp, lines)
    lines_text = b"".join(lines).decode()
    # The worker died after one to three lines (usually one); the end names the loss.
    assert lines_text in ["".join(greetings[:n]) + lost for n in (1, 2, 3)], lines_text
    if curl_process:
        curl_lines.append(await curl_process.stdout.read())
        assert await curl_process.wait() == 18
        curl_text = b"".join(curl_lines).decode()
        assert curl_text in ["".join(greetings[:n]) + lost for n in (1, 2, 3)], curl_text

    stats = wait_until(lambda: (s := gateway.stats()) and s["workers"][0]["state"] == "evicted"
                       and s, 5, "worker-1 to be evicted")
    assert time.monotonic() - killed < 5
    assert stats["broker"]["evictions"] == 1
    assert stats["broker"]["inflight"] == 0
    assert reported(gateway, 2 if CURL else 1)["gateway"]["incomplete"] == (2 if CURL else 1)
    no_traceback(gateway.proc)


@async_test
async def test_a_client_disconnecting_mid_stream_cancels_the_workers_request(stack):
    stack.broker()
    worker = stack.worker("worker-1", sleep_time=0.5)
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    body = b'{"text": "a,b,c,d,e,f,g,h,i,j"}'  # 5 s of work if nobody cancels it

    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{gateway.url}/generate", data=body,
                                  headers={"Content-Type": JSON})
        assert resp.status == 200
        assert await resp.content.readline() == b"Hello a!\n"
        resp.close()  # drops the connection
    clients = 1
    if CURL:
        process = await start_curl(f"{gateway.url}/generate", body)
        assert await process.stdout.readline() == b"Hello a!\n"
        process.kill()
        await process.wait()
        clients += 1

    def settled():
        stats = gateway.stats()
        return stats if stats and (
            stats["broker"]["cancelled"], stats["broker"]["inflight"],
            stats["workers"][0]["inflight"], stats["gateway"]["inflight"],
            stats["gateway"]["disconnects"]) == (clients, 0, 0, 0, clients) else None

    # (The gateway's counters are those it reported to the broker, once a heartbeat.)
    stats = wait_until(settled, 5, "the cancellations to reach the broker and the worker")
    assert stats["broker"]["completed"] == 0
    assert workers_by_id(stats)["worker-1"]["completed"] == 0
    wait_until(lambda: worker.output().count(" cancelled\n") == clients, 3,
               "the worker to log its cancelled requests")
    no_traceback(gateway.proc)
    no_traceback(worker)


# --- configuration --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_deadline_before_the_first_line_answers_504_and_stops_the_worker(stack):
    stack.broker()
    worker = stack.worker("w1", sleep_time=5)
    stack.wait_workers("w1")
    gateway = start_gateway(stack, "--Frontend.request_timeout=0.5")
    started = time.monotonic()
    reply = http("POST", f"{gateway.url}/generate", b'{"text": "slow"}', timeout=10)
    elapsed = time.monotonic() - started
    assert reply is not None and reply.status == 504
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json() == {"error": "no reply within Frontend.request_timeout (0.5 s)",
                            "code": "timeout"}
    assert 0.5 <= elapsed < 2.5
    wait_until(lambda: "cancelled" in worker.output(), 5, "the worker to be told to stop")


def test_a_body_that_is_not_json_is_told_what_to_send(shared):
    reply = http("POST", f"{shared.gateway.url}/generate", b"text=a,b")
    assert reply.status == 400
    assert json.loads(reply.body)["error"].endswith(
        'send a JSON object such as {"text": "a,b"} with Content-Type: application/json')



# --- what the gateway takes from its settings ----------------------------------------


def test_the_gateway_takes_the_frontend_section_and_reaches_the_broker_as_clients_do():
    config = load_config(overrides=["Frontend.max_body=100", "Broker.heartbeat_interval=0.5",
                                    "Broker.heartbeat_misses=7"])
    gateway = Gateway(config.frontend, config.broker.for_clients(), "gateway-7")
    assert gateway.settings.max_body == 100
    client = gateway.client
    assert (client.address, client.heartbeat_interval, client.heartbeat_misses, client.name,
            client.timeout) == (config.broker.frontend, 0.5, 7, "gateway-7",
                                config.frontend.request_timeout)
