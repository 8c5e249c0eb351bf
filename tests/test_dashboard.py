"""What operators look at: GET /stats/stream (the stats as Server-Sent Events, one poll
for every viewer), GET /dashboard, in a real browser too, and Frontend.admin_port,
which serves them apart from /generate. Real processes on free ports."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import signal
import socket
import subprocess
import time
from fnmatch import fnmatch
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.feed import FEED_BACKLOG, StatsFeed, quantile
from gateway.metrics import LATENCY_BUCKETS
from tests.browser import Browser, BrowserUnavailable
from tests.handlers import FAILURE
from tests.http_support import (CURL, ROOT, async_test, get_json, handler_worker, http,
                                start_gateway, wait_healthy)
from tests.support import async_wait_until, free_port, run_zroute, wait_until
from zroute.http import read_events

pytestmark = pytest.mark.timeout(40)

STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                  "X-Accel-Buffering": "no"}


async def next_events(resp: aiohttp.ClientResponse, count: int, kind: str = "stats"
                      ) -> list[dict]:
    """The data of the next `count` events of type `kind` (others are passed over)."""
    found = []
    async for event, data in read_events(resp):
        if event == kind:
            found.append(orjson.loads(data))
            if len(found) == count:
                return found
    raise AssertionError(f"the feed ended after {len(found)} {kind} event(s)")


# --- /stats/stream -----------------------------------------------------------------------


@async_test
async def test_the_feed_sends_the_history_then_the_stats_once_per_interval(stack):
    stack.broker()
    stack.worker("worker-1")
    gateway = start_gateway(stack, "--Frontend.stats_feed_interval=0.2")
    wait_healthy(gateway, 1)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"{gateway.url}/generate", json={"text": "a"}) as resp:
                assert resp.status == 200
        async with session.get(f"{gateway.url}/stats/stream") as resp:
            assert resp.status == 200
            assert {name: resp.headers[name] for name in STREAM_HEADERS} == STREAM_HEADERS
            [history] = await next_events(resp, 1, "history")
            assert (history["interval_s"], history["window_s"]) == (0.2, 300.0)
            began = time.monotonic()
            events = await next_events(resp, 6)
            elapsed = time.monotonic() - began
    # Once per interval, each what /stats answers with the time and the interval's point.
    assert 0.8 < elapsed < 2.0, elapsed
    assert all(set(e) == {"broker", "brokers", "workers", "gateways", "gateway", "time", "point"}
               for e in events)
    assert events[-1]["broker"]["requests"] == 3
    assert [w["id"] for w in events[-1]["workers"]] == ["worker-1"]
    point = events[-1]["point"]
    assert set(point) == {"t", "requests_per_s", "errors_per_s", "latency_p50_s",
                          "latency_p99_s", "queue_depth", "inflight"}
    assert (point["requests_per_s"], point["errors_per_s"], point["queue_depth"]) == (0, 0, 0)

    if CURL:  # as a person would watch it
        result = subprocess.run([CURL, "-sSN", "--max-time", "1", f"{gateway.url}/stats/stream"],
                                capture_output=True, text=True, timeout=10)
        assert result.returncode == 28, result.stderr  # 28: the time ran out, as asked
        assert result.stdout.startswith("retry: 1000\n\nevent: history\ndata: {")
        assert result.stdout.count("event: stats\ndata: {\"broker\":") >= 3


@async_test
async def test_every_viewer_gets_the_same_events_of_one_shared_poll(stack):
    stack.broker()
    stack.worker("worker-1")
    gateway = start_gateway(stack, "--Frontend.stats_feed_interval=0.2")
    wait_healthy(gateway, 1)

    async def watch(session: aiohttp.ClientSession) -> dict[float, dict]:
        async with session.get(f"{gateway.url}/stats/stream") as resp:
            return {event["time"]: event for event in await next_events(resp, 8)}

    async with aiohttp.ClientSession() as session:
        seen = await asyncio.gather(*(watch(session) for _ in range(6)))
    times = set().union(*seen)
    # One build per interval, whoever watches: six viewers of 8 events see about 8
    # builds, not 48, and the same one alike.
    assert len(times) <= 10, sorted(times)
    for at in times:
        assert len({orjson.dumps(by_time[at]) for by_time in seen if at in by_time}) == 1


@async_test
async def test_a_viewer_that_reads_nothing_is_dropped_and_the_others_go_on():
    padding = "x" * 200_000  # large events: a viewer's buffers fill in a few

    async def stats_source() -> tuple[dict, dict]:
        broker = {"boot_id": "1", "requests": 0, "errors": 0, "queue_depth": 0, "inflight": 0}
        return {"broker": broker, "padding": padding}, {}

    feed = StatsFeed(stats_source, 0.05, 10, {})
    runner = web.ServerRunner(web.Server(feed.stream))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stalled = socket.socket()
    try:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(b"GET /stats/stream HTTP/1.1\r\nHost: zroute\r\n\r\n")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/stats/stream") as resp:
                await async_wait_until(lambda: len(feed.subscribers) == 2, 5, "both viewers")
                reading = asyncio.ensure_future(next_events(resp, 10_000))
                await async_wait_until(lambda: len(feed.subscribers) == 1, 10,
                                       f"the viewer that reads nothing to be dropped after "
                                       f"{FEED_BACKLOG} events")
                # The reader goes on; what waits for the dropped one is let go.
                await asyncio.sleep(0.3)
                assert not reading.done() and len(feed.subscribers) == 1
                reading.cancel()
        # Reset, so that the kernel does not keep what it held for the viewer either.
        stalled.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while stalled.recv(1 << 20):
                pass
            raise AssertionError("the connection was closed, not reset")
    finally:
        stalled.close()
        await runner.cleanup()


@async_test
async def test_feeds_past_the_limit_are_refused_with_a_503_that_says_why(stack):
    stack.broker()
    stack.worker("worker-1")
    gateway = start_gateway(stack, "--Frontend.max_stats_feeds=2")
    wait_healthy(gateway, 1)
    url = f"{gateway.url}/stats/stream"
    async with aiohttp.ClientSession() as session:
        first = await session.get(url)
        second = await session.get(url)
        await next_events(first, 1, "history")
        await next_events(second, 1, "history")
        async with session.get(url) as refused:
            assert (refused.status, refused.headers["Retry-After"]) == (503, "1")
            assert await refused.json() == {
                "error": "the gateway serves its limit of stats feeds "
                         "(Frontend.max_stats_feeds, 2); close one, or retry later",
                "code": "too_many_feeds"}
        first.close()

        async def accepted() -> bool:
            async with session.get(url) as resp:
                return resp.status == 200

        await async_wait_until(accepted, 5, "a feed once one has closed")
        second.close()


@async_test
async def test_the_feed_says_when_the_broker_is_unreachable_and_picks_up_again(stack):
    broker = stack.broker()
    stack.worker("worker-1")
    gateway = start_gateway(stack, "--Frontend.stats_feed_interval=0.2")
    wait_healthy(gateway, 1)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.url}/stats/stream") as resp:
            await next_events(resp, 1)
            broker.kill()
            [down] = await asyncio.wait_for(next_events(resp, 1, "unavailable"), 5)
            assert (down["code"], down["error"]) == ("broker_unreachable",
                                                     "the broker is unreachable")
            stack.start("broker-again", "broker", "--frontend", stack.frontend,
                        "--backend", stack.backend)
            [back] = await asyncio.wait_for(next_events(resp, 1), 15)
            assert back["broker"]["uptime_s"] < 15


@async_test
async def test_a_gateway_with_viewers_stops_at_once(stack):
    stack.broker()
    stack.worker("worker-1")
    gateway = start_gateway(stack)  # Frontend.drain_timeout: 30 s
    wait_healthy(gateway, 1)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.url}/stats/stream") as resp:
            await next_events(resp, 1)
            began = time.monotonic()
            gateway.proc.signal(signal.SIGTERM)
            async for _ in read_events(resp):
                pass  # the feed ends: a viewer is nothing to wait for
    assert gateway.proc.wait(5) == 0
    assert time.monotonic() - began < 3


def test_quantiles_come_from_the_latency_buckets():
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    assert quantile(counts, 0.5) is None
    counts[LATENCY_BUCKETS.index(0.5)] = 10  # ten requests between 0.25 s and 0.5 s
    assert quantile(counts, 0.5) == pytest.approx(0.375)
    assert quantile(counts, 0.99) == pytest.approx(0.4975)
    counts[-1] = 1000  # most over the largest bound: at least that
    assert quantile(counts, 0.99) == LATENCY_BUCKETS[-1]


# --- /dashboard ------------------------------------------------------------------------


def csp_source(html: str, tag: str) -> str:
    return re.search(f"<{tag}>(.*)</{tag}>", html, re.S).group(1)


def test_the_dashboard_is_one_small_page_that_loads_nothing_from_elsewhere(stack):
    gateway = start_gateway(stack)  # the page needs no broker
    reply = http("GET", f"{gateway.url}/dashboard")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    html = reply.body.decode()
    assert len(reply.body) < 64 << 10
    # Nothing from elsewhere: no src, no link but the empty icon and the page's own.
    assert not re.search(r"\ssrc=", html)
    assert re.findall(r'href="([^"]*)"', html) == ["data:,", "stats/stream", "stats"]
    # The policy runs this script and this style only, and connects to the gateway only.
    policy = reply.headers["content-security-policy"]
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        digest = hashlib.sha256(csp_source(html, tag).encode()).digest()
        assert f"{directive} 'sha256-{base64.b64encode(digest).decode()}'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_the_pages_files_are_package_data_for_a_non_editable_install():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["gateway"]
    static = [path.relative_to(ROOT / "gateway").as_posix()
              for path in (ROOT / "gateway" / "static").iterdir()]
    assert static and all(any(fnmatch(name, pattern) for pattern in patterns)
                          for name in static), (static, patterns)


# --- Frontend.admin_port ---------------------------------------------------------------

OPERATORS = ("/stats", "/stats/stream", "/metrics", "/dashboard")


@async_test
async def test_the_admin_port_serves_the_operators_endpoints_apart_from_generate(stack):
    stack.broker()
    stack.worker("worker-1")
    admin_port = free_port()
    gateway = start_gateway(stack, f"--Frontend.admin_port={admin_port}")
    wait_healthy(gateway, 1)
    admin = f"http://127.0.0.1:{admin_port}"
    async with aiohttp.ClientSession() as session:
        for path in OPERATORS:
            async with session.get(f"{gateway.url}{path}") as resp:
                assert (resp.status, await resp.json()) == (404, {
                    "error": f"no such path {path!r}; the paths are /generate, /health",
                    "code": "not_found"})
            async with session.get(f"{admin}{path}") as resp:
                assert resp.status == 200, path
        async with session.post(f"{admin}/generate", json={"text": "a"}) as resp:
            assert resp.status == 404
        async with session.post(f"{gateway.url}/generate", json={"text": "a"}) as resp:
            assert (resp.status, await resp.text()) == (200, "Hello a!\n")
    assert get_json(f"{admin}/health") == get_json(f"{gateway.url}/health") == {
        "status": "ok", "workers": 1}
    assert "operators' endpoints on http://127.0.0.1:" in gateway.proc.output()


def test_an_admin_port_that_is_the_http_port_is_refused(stack):
    port = free_port()
    result = run_zroute("gateway", "--broker", stack.frontend, "--port", str(port),
                        f"--Frontend.admin_port={port}")
    assert (result.returncode, result.stderr) == (2, (
        f"zroute gateway: error: Frontend.admin_port ({port}) is Frontend.port: give the "
        "operators' endpoints a port of their own, or 0 to serve them on Frontend.port "
        "with /generate\n"))


@pytest.mark.timeout(60)
def test_serve_with_an_admin_port_announces_the_dashboard_there(stack):
    port, admin_port = free_port(), free_port()
    serve = stack.start("serve", "serve", "--port", str(port),
                        f"--Frontend.admin_port={admin_port}", "--Frontend.ServiceArgs.workers=2",
                        f"--Broker.frontend={stack.frontend}", f"--Broker.backend={stack.backend}",
                        "--Backend.sleep_time=0")
    admin = f"http://127.0.0.1:{admin_port}"
    wait_until(lambda: "\nTry:\n" in serve.output(), 30, "zroute serve to announce itself")
    assert f"  curl {admin}/stats    # or open {admin}/dashboard in a browser\n" in serve.output()
    assert get_json(f"{admin}/stats")["broker"]["workers_ready"] == 1
    assert http("GET", f"{admin}/dashboard").status == 200
    assert http("GET", f"http://127.0.0.1:{port}/stats").status == 404
    serve.signal(signal.SIGTERM)
    assert serve.wait(20) == 0


# --- in a browser ----------------------------------------------------------------------

ARTIFACTS = ROOT / "test-artifacts"  # screenshots; ignored by git


async def open_browser(url: str, work_dir: Path) -> Browser:
    try:
        return await Browser.open(url, work_dir)
    except BrowserUnavailable as e:
        pytest.skip(str(e))


def worker_rows_js() -> str:
    """The workers' rows as a person reads them: {id: [cell texts]}."""
    return ("Object.fromEntries([...document.querySelectorAll('#workers tbody tr')]"
            ".map((row) => [row.cells[0].innerText, [...row.cells].map((c) => c.innerText)]))")


def series_points_js(chart: str, series: str) -> str:
    """How many points a chart's line joins."""
    return (f"(document.querySelector('#{chart} path[data-series={series}]')"
            f".getAttribute('d').match(/L/g) || []).length")


@pytest.mark.timeout(120)
@async_test
async def test_the_dashboard_in_a_browser_shows_workers_a_kill_the_charts_and_a_lost_broker(
        stack, tmp_path):
    stack.broker()
    stack.worker("worker-1", "--capacity", "4", sleep_time=0.05)
    doomed = stack.worker("worker-2", sleep_time=0.05)
    gateway = start_gateway(stack)  # the defaults: an update a second, heartbeats of 1 s
    wait_healthy(gateway, 2)
    stop_load = asyncio.Event()

    async def load() -> None:  # a steady trickle, for the charts
        async with aiohttp.ClientSession() as session:
            while not stop_load.is_set():
                async with session.post(f"{gateway.url}/generate", json={"text": "a,b"}) as resp:
                    try:
                        await resp.read()
                    except aiohttp.ClientPayloadError:
                        pass  # a stream on the worker killed below ends cut: as it must
                await asyncio.sleep(0.05)

    loading = asyncio.ensure_future(load())
    browser = await open_browser(f"{gateway.url}/dashboard", tmp_path)
    shot = ARTIFACTS / "dashboard.png"
    try:
        async def both_listed() -> dict[str, list[str]] | None:
            found = await browser.evaluate(worker_rows_js())
            return found if len(found) == 2 else None

        found = await async_wait_until(both_listed, 15, "the page to list the workers")
        assert sorted(found) == ["worker-1", "worker-2"]
        await async_wait_until(lambda: browser.evaluate(series_points_js(
            "chart-rate", "requests_per_s")), 15, "the request rate to be drawn")
        found = await browser.evaluate(worker_rows_js())
        one = found["worker-1"]
        assert (one[1], one[2]) == ("generate", "ready")
        assert re.fullmatch(r"\d / 4", one[3]), one  # in flight against its capacity
        assert re.fullmatch(r"\d+\.\d s ago", one[8]), one
        assert await browser.evaluate("document.getElementById('status').innerText") == "live"

        doomed.kill()
        killed = time.monotonic()
        await async_wait_until(lambda: is_gone(browser), 10, "the page to show worker-2 gone")
        # Within the heartbeat window (3 x 1 s), and the page's next update (1 s).
        assert time.monotonic() - killed < 3 + 1 + 1
        events = await browser.evaluate("document.getElementById('events').innerText")
        assert "worker-2 is gone (evicted)" in events

        # The charts drew what they were sent: rates, latencies, the queue.
        for chart, series in (("chart-rate", "requests_per_s"), ("chart-latency",
                                                                 "latency_p99_s"),
                              ("chart-queue", "inflight")):
            assert await browser.evaluate(series_points_js(chart, series)) >= 2, chart
        rate_legend = await browser.evaluate(
            "document.querySelector('#chart-rate text:last-of-type').textContent")
        await browser.screenshot(shot)

        # The broker goes: the page says so at once, and comes back by itself.
        stop_load.set()
        await loading
        [broker] = [proc for proc in stack.procs if proc.name == "broker"]
        broker.kill()
        await async_wait_until(lambda: browser.evaluate(
            "!document.getElementById('banner').hidden"), 5, "the page to say the broker is gone")
        assert await browser.evaluate("document.getElementById('status').innerText") == (
            "broker unreachable")
        await browser.screenshot(ARTIFACTS / "dashboard-broker-unreachable.png")
        stack.start("broker-again", "broker", "--frontend", stack.frontend,
                    "--backend", stack.backend)
        await async_wait_until(lambda: browser.evaluate(
            "document.getElementById('banner').hidden"), 15, "the page to pick up again")
        assert await browser.evaluate("document.getElementById('status').innerText") == "live"
        print(f"screenshots in {ARTIFACTS}; the rate chart's legend said {rate_legend!r}")
    finally:
        stop_load.set()
        if not shot.exists():
            await browser.screenshot(ARTIFACTS / "dashboard-failed.png")
        await browser.close()
        await asyncio.gather(loading, return_exceptions=True)


async def is_gone(browser: Browser) -> bool:
    cells = (await browser.evaluate(worker_rows_js())).get("worker-2", [])
    return cells[2:3] == ["gone (evicted)"] and cells[8] == "–"


README_JS = "```js\n(.*?)```"


@pytest.mark.timeout(60)
@async_test
async def test_the_readmes_fetch_readers_read_each_format_in_a_browser(stack, tmp_path):
    stack.broker()
    stack.worker("worker-1")
    handler_worker(stack, "fails", "fail_mid_stream", "--Backend.expose_errors=true").expect(
        0, traceback=True)
    gateway = start_gateway(stack)
    wait_healthy(gateway, 2)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n### Streaming formats\n"):]
    code = re.search(README_JS, section, re.S).group(1)
    code = re.sub(r"^await .*$", "", code, flags=re.M)  # the example call at the end
    browser = await open_browser(f"{gateway.url}/health", tmp_path)  # the gateway's origin
    try:
        await async_wait_until(lambda: browser.evaluate("document.readyState === 'complete' "
                                                        "&& location.pathname === '/health'"),
                               10, "the gateway's page")
        results = await browser.evaluate(f"""(async () => {{
            {code}
            const results = {{}};
            for (const [name, read] of [["text", readText], ["events", readEvents],
                                        ["objects", readObjects]]) {{
                const chunks = [];
                await read("/generate?worker=worker-1", {{text: "world,universe"}},
                           (chunk) => chunks.push(chunk));
                let failure = null;
                try {{
                    await read("/generate?worker=fails", {{}}, () => {{}});
                }} catch (error) {{
                    failure = String(error.message);
                }}
                results[name] = {{chunks, failure}};
            }}
            return results;
        }})()""")
    finally:
        await browser.close()
    greetings = ["Hello world!\n", "Hello universe!\n"]
    assert "".join(results["text"]["chunks"]) == "".join(greetings)
    assert results["text"]["failure"]  # a broken transfer: the browser's network error
    for name in ("events", "objects"):
        assert results[name] == {"chunks": greetings, "failure": f"RuntimeError: {FAILURE}"}
