"""POST /generate in the formats clients expect (plain text, Server-Sent Events, NDJSON),
read with aiohttp, zroute.http and curl as the README shows it, and through nginx with
its default proxy settings: real processes on free ports."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from gateway.formats import LINE_END, NDJSON, PLAIN, SSE, EventStream, negotiate
from tests.handlers import FAILURE
from tests.http_support import (CURL, ROOT, async_test, handler_worker, http, start_gateway,
                                wait_healthy)
from tests.support import Proc, Stack, free_port, wait_until
from zroute.http import HttpStreamError, generate, read_chunks

pytestmark = pytest.mark.timeout(30)

MULTILINE = ["Hello\n", "two\nlines", "", "crlf\r\nand cr\rend", " leading space"]
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- choosing and encoding a format, without sockets -----------------------------------


@pytest.mark.parametrize("accept, chosen", [
    (None, PLAIN), ("*/*", PLAIN), ("text/plain", PLAIN), ("application/json", PLAIN),
    ("text/*", PLAIN),  # plain text and SSE match as closely: plain, as always
    (SSE, SSE), (NDJSON, NDJSON), ("text/event-stream, */*", SSE),
    ("text/plain;q=0.5, application/x-ndjson", NDJSON),
    ("text/event-stream;q=0.2, text/plain", PLAIN),
    ("text/event-stream;q=0, */*", PLAIN),
    ("TEXT/EVENT-STREAM", SSE), ("application/x-ndjson; q=oops", PLAIN),
])
def test_the_accept_header_picks_the_format_and_anything_else_is_plain(accept, chosen):
    assert negotiate(accept).content_type.partition(";")[0] == chosen.partition(";")[0]


def parse_sse(body: bytes) -> list[tuple[str, str]]:
    """The (type, data) of each event a browser's EventSource would dispatch: the
    parsing rules of the HTML standard, for a stream without ids or retries."""
    events, event, data = [], "", None
    for line in LINE_END.split(body.decode()):
        if not line:
            if data is not None:
                events.append((event or "message", data.removesuffix("\n")))
            event, data = "", None
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data = (data or "") + value + "\n"
    return events


@given(st.lists(st.text()))
def test_each_chunk_is_one_event_whatever_its_lines(chunks):
    body = EventStream().encode([chunk.encode() for chunk in chunks], last=True)
    # SSE is text of lines: a line ends at CR, LF or CR LF, and each arrives as LF.
    assert parse_sse(body) == [("message", LINE_END.sub("\n", c)) for c in chunks] + [("end", "")]


def test_a_character_split_between_two_chunks_arrives_whole():
    stream = EventStream()
    body = stream.encode([b"caf\xc3"], last=False) + stream.encode([b"\xa9 ok", b"\xff"], last=True)
    assert parse_sse(body) == [("message", "caf"), ("message", "é ok"), ("message", "\ufffd"),
                               ("end", "")]


# --- through the gateway ---------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A gateway and one worker per handler, each request naming its worker."""
    stack = Stack(tmp_path_factory.mktemp("formats"))
    try:
        stack.broker()
        stack.worker("greeter")
        handler_worker(stack, "chunks", "chunks")
        # These two log their handler's traceback, as a worker does.
        for worker_id, handler in (("fails-mid-stream", "fail_mid_stream"),
                                   ("fails-at-once", "fail_at_once")):
            handler_worker(stack, worker_id, handler, "--Backend.expose_errors=true").expect(
                0, traceback=True)
        gateway = start_gateway(stack)
        wait_healthy(gateway, 4)
        yield gateway
    finally:
        stack.close()


async def post(url: str, worker: str, body: dict, accept: str | None = None
               ) -> tuple[int, dict, bytes, bool]:
    """Status, headers, the body as it came, and whether the transfer completed."""
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/generate", json=body, params={"worker": worker},
                                headers=headers) as resp:
            received = []
            try:
                async for data in resp.content.iter_any():
                    received.append(data)
                complete = True
            except aiohttp.ClientPayloadError:
                complete = False
            return resp.status, dict(resp.headers), b"".join(received), complete


@async_test
async def test_sse_sends_one_event_per_chunk_each_line_its_own_data_line(served):
    status, headers, body, complete = await post(served.url, "chunks", {"chunks": MULTILINE}, SSE)
    assert (status, headers["Content-Type"], complete) == (200, SSE, True)
    assert {name: headers[name] for name in STREAM_HEADERS} == STREAM_HEADERS
    assert body == (b"data: Hello\ndata:\n\n"
                    b"data: two\ndata: lines\n\n"
                    b"data:\n\n"
                    b"data: crlf\ndata: and cr\ndata: end\n\n"
                    b"data:  leading space\n\n"
                    b"event: end\ndata:\n\n")


@async_test
async def test_ndjson_sends_one_object_per_chunk_then_done(served):
    status, headers, body, complete = await post(served.url, "chunks", {"chunks": MULTILINE},
                                                 NDJSON)
    assert (status, headers["Content-Type"], complete) == (200, NDJSON, True)
    assert {name: headers[name] for name in STREAM_HEADERS} == STREAM_HEADERS
    assert [orjson.loads(line) for line in body.splitlines()] == (
        [{"chunk": chunk} for chunk in MULTILINE] + [{"done": True}])


@async_test
async def test_plain_text_is_as_it_was_and_says_not_to_buffer_it(served):
    for accept in (None, "*/*", "application/json"):
        status, headers, body, complete = await post(served.url, "chunks",
                                                     {"chunks": MULTILINE}, accept)
        assert (status, headers["Content-Type"], complete) == (200, "text/plain; charset=utf-8",
                                                               True)
        assert {name: headers[name] for name in STREAM_HEADERS} == STREAM_HEADERS
        assert body == "".join(MULTILINE).encode()


@pytest.mark.parametrize("accept, ending, complete", [
    (SSE, b'data: Hello world!\ndata:\n\nevent: error\ndata: {"error":"RuntimeError: '
          + FAILURE.encode() + b'","code":"handler_error"}\n\n', True),
    (NDJSON, b'{"chunk":"Hello world!\\n"}\n{"error":"RuntimeError: ' + FAILURE.encode()
             + b'","code":"handler_error"}\n', True),
    # Plain text cannot say how it ended but by cutting the transfer short.
    (None, b"Hello world!\n\nerror: handler_error: RuntimeError: " + FAILURE.encode() + b"\n",
     False),
])
@async_test
async def test_a_stream_that_fails_ends_with_its_error(served, accept, ending, complete):
    status, _, body, completed = await post(served.url, "fails-mid-stream", {}, accept)
    assert (status, body, completed) == (200, ending, complete)


@pytest.mark.parametrize("accept", [SSE, NDJSON, None])
@async_test
async def test_an_error_before_the_first_chunk_is_the_json_error_in_every_format(served,
                                                                                accept):
    status, headers, body, complete = await post(served.url, "fails-at-once", {}, accept)
    assert (status, headers["Content-Type"], complete) == (502, "application/json", True)
    assert orjson.loads(body) == {"error": f"RuntimeError: {FAILURE}", "code": "handler_error"}


# --- zroute.http -----------------------------------------------------------------------


@pytest.mark.parametrize("accept", [SSE, NDJSON])
@async_test
async def test_the_http_reader_yields_each_chunk(served, accept):
    async with aiohttp.ClientSession() as session:
        chunks = [chunk async for chunk in generate(session, served.url, {"chunks": MULTILINE},
                                                    accept=accept, params={"worker": "chunks"})]
    expected = [LINE_END.sub("\n", c) for c in MULTILINE] if accept == SSE else MULTILINE
    assert chunks == expected


@async_test
async def test_the_http_reader_yields_plain_text_as_it_comes(served):
    async with aiohttp.ClientSession() as session:
        pieces = [chunk async for chunk in generate(session, served.url, {"chunks": MULTILINE},
                                                    accept="text/plain",
                                                    params={"worker": "chunks"})]
    assert "".join(pieces) == "".join(MULTILINE)


@pytest.mark.parametrize("accept", [SSE, NDJSON, "text/plain"])
@async_test
async def test_the_http_reader_raises_the_error_a_stream_ends_with(served, accept):
    received = []
    async with aiohttp.ClientSession() as session:
        with pytest.raises(HttpStreamError) as raised:
            async for chunk in generate(session, served.url, {}, accept=accept,
                                        params={"worker": "fails-mid-stream"}):
                received.append(chunk)
        assert (raised.value.code, raised.value.message, raised.value.status) == (
            "handler_error", f"RuntimeError: {FAILURE}", 200)
        assert "".join(received).startswith("Hello world!\n")

        with pytest.raises(HttpStreamError) as raised:
            async for _ in generate(session, served.url, {}, accept=accept,
                                    params={"worker": "fails-at-once"}):
                pass
        assert (raised.value.code, raised.value.status) == ("handler_error", 502)


@async_test
async def test_the_http_reader_tells_a_stream_cut_short_from_a_complete_one():
    """A reply that stops without its end marker (a proxy or the network cut it) raises
    `incomplete`, in every format."""
    bodies = {SSE: b"data: Hello\n\n", NDJSON: b'{"chunk":"Hello"}\n', PLAIN: b"Hello"}

    async def cut_short(request: web.BaseRequest) -> web.StreamResponse:
        content_type = request.headers["Accept"]
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(bodies[content_type])
        request.transport.close()  # no terminating chunk
        return response

    runner = web.ServerRunner(web.Server(cut_short))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            for accept in bodies:
                received = []
                with pytest.raises(HttpStreamError) as raised:
                    async with session.post(f"http://127.0.0.1:{port}/generate",
                                            headers={"Accept": accept}) as resp:
                        async for chunk in read_chunks(resp):
                            received.append(chunk)
                assert (received, raised.value.code) == (["Hello"], "incomplete"), accept
    finally:
        await runner.cleanup()


# --- the README's curl commands, as written --------------------------------------------

README_SECTION = "### Streaming formats"


def readme_curl_examples() -> list[tuple[str, str]]:
    """(command, output) of each curl command in the README's section on formats, with
    the output block that follows it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(f"\n{README_SECTION}\n"):]
    section = section[:section.index("\n### ", 1)]
    return re.findall(r"```bash\n(curl .*?)```\n```\n(.*?)```", section, re.S)


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_the_readmes_curl_commands_give_the_output_it_shows(stack):
    stack.broker()
    stack.worker("worker-1")  # the greeting, as `zroute serve` runs it with no config
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    examples = readme_curl_examples()
    assert len(examples) >= 3, "the README's section on formats has a curl command per format"
    for command, output in examples:
        command = command.replace("http://localhost:8000", gateway.url)
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                timeout=10)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout == output, (command, result.stdout)


# --- behind nginx ----------------------------------------------------------------------

NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx",) if Path(path).exists()), None)
SLEEP_TIME = 0.4
# nginx as installed: no proxy_buffering, proxy_http_version or any other setting of
# how it proxies. /held/ is the same, but ignores X-Accel-Buffering: what nginx does to
# a stream that does not say it is one.
NGINX_CONF = """daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://127.0.0.1:{upstream}; }}
        location /held/ {{
            proxy_pass http://127.0.0.1:{upstream}/;
            proxy_ignore_headers X-Accel-Buffering;
        }}
    }}
}}
"""


@pytest.fixture
def behind_nginx(stack, tmp_path):
    """A gateway whose worker waits SLEEP_TIME before each word, and nginx in front."""
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian's nginx-light; .ci/run installs it)")
    stack.broker()
    stack.worker("worker-1", sleep_time=SLEEP_TIME)
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp_path, port=port, upstream=gateway.port))
    nginx = Proc("nginx", [NGINX, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                           "-c", str(conf)], tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: not nginx.alive or http("GET", f"{url}/health") is not None, 10,
                       "nginx to answer")
        except AssertionError:
            pass
        if not nginx.alive or http("GET", f"{url}/health") is None:
            pytest.skip(f"nginx does not run here: {nginx.output()[-500:]}")
        yield SimpleNamespace(url=url, gateway=gateway)
    finally:
        nginx.stop()


async def arrivals(url: str, accept: str | None) -> list[float]:
    """When each greeting's line arrived."""
    headers = {"Accept": accept} if accept else {}
    times = []
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={"text": "a,b,c"}, headers=headers) as resp:
            assert resp.status == 200
            while line := await resp.content.readline():
                if b"Hello" in line:
                    times.append(time.monotonic())
    assert len(times) == 3
    return times


@pytest.mark.timeout(40)
@async_test
async def test_nginx_with_its_default_settings_passes_each_line_on_as_it_comes(behind_nginx):
    for accept in (None, SSE, NDJSON):
        first, second, third = await arrivals(f"{behind_nginx.url}/generate", accept)
        assert second - first > SLEEP_TIME / 2 and third - second > SLEEP_TIME / 2, accept
    # What the header prevents: the same nginx, deaf to it, holds the lines to the end.
    first, _, third = await arrivals(f"{behind_nginx.url}/held/generate", SSE)
    assert third - first < SLEEP_TIME / 2
