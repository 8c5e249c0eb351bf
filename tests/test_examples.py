"""The pipelines of examples/ as a user runs them, over HTTP: `zroute serve
examples/FILE:Frontend` with the defaults and with examples/config.yaml (their outputs,
the time between lines, round robin, random, a direct call, a worker chosen by its
load); then the multistage pipeline's processes one by one, so that a test can kill a
Middle worker: before its first chunk (the broker retries it elsewhere) and mid-stream
(a visible error)."""

from __future__ import annotations

import ast
import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.http_support import SEED_OUTPUT, SEED_TEXT, get_json, http, start_gateway
from tests.support import (REPO_ROOT, Proc, Stack, async_wait_until, free_port,
                           readme_example, wait_until, workers_by_id)
from zroute.http import NDJSON, HttpStreamError, generate

CONFIG = "examples/config.yaml"
GOODNIGHT_OUTPUT = "Goodnight sun!\nGoodnight moon!\nGoodnight stars!\n"
MULTISTAGE = "examples/multistage_pipeline.py:Frontend"


def serve(stack: Stack, example: str, *args: str) -> str:
    """`zroute serve examples/EXAMPLE:Frontend ARGS` on free ports; its URL once it has
    announced itself (every service has a ready worker)."""
    stack.cwd = REPO_ROOT
    port = free_port()
    proc = stack.start("serve", "serve", f"examples/{example}:Frontend", *args,
                       "--port", str(port), f"--Broker.frontend={stack.frontend}",
                       f"--Broker.backend={stack.backend}")
    wait_until(lambda: "\nTry:\n" in proc.output(), 30, f"serve of {example} to announce itself")
    return f"http://127.0.0.1:{port}"


def post(url: str, body: dict[str, Any], path: str = "/generate") -> tuple[int, str]:
    reply = http("POST", f"{url}{path}", orjson.dumps(body), timeout=10)
    assert reply is not None, f"nothing answered at {url}{path}"
    return reply.status, reply.body.decode()


def completed(url: str) -> dict[str, int]:
    """Each worker's completed requests, from the gateway's /stats."""
    return {worker_id: w["completed"]
            for worker_id, w in workers_by_id(get_json(f"{url}/stats")).items()}


def wait_completed(url: str, expected: dict[str, int]) -> None:
    wait_until(lambda: completed(url) == expected, 5,
               f"the workers' completed counts to be {expected} (they are {completed(url)})")


def check_round_robin(url: str) -> None:
    """Four requests of the seed's config, two on each Backend worker."""
    for _ in range(4):
        assert post(url, {"text": "sun,moon,stars"}) == (200, GOODNIGHT_OUTPUT)
    wait_completed(url, {"Backend-1": 2, "Backend-2": 2})


async def timed_chunks(url: str, text: str) -> list[tuple[float, str]]:
    """The chunks of POST /generate {"text": text}, each with its time of arrival."""
    async with aiohttp.ClientSession() as session:
        return [(time.monotonic(), chunk)
                async for chunk in generate(session, url, {"text": text}, accept=NDJSON)]


def gaps(arrivals: list[tuple[float, str]]) -> list[float]:
    return [later - earlier for (earlier, _), (later, _) in zip(arrivals, arrivals[1:])]


# --- the README's code is the examples' ------------------------------------------------


def code(source: str, class_name: str | None = None) -> str:
    """The code of `source` (or of its class `class_name`), without comments and
    docstrings."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:]
    if class_name is not None:
        tree = next(node for node in tree.body
                    if isinstance(node, ast.ClassDef) and node.name == class_name)
    return ast.dump(tree)


@pytest.mark.parametrize("heading, example, class_name", [
    ("## Write your own services", "simple_pipeline.py", None),
    ("### Routing per call, and direct calls", "routed_pipeline.py", "Frontend"),
    ("### A pipeline of three stages", "multistage_pipeline.py", "Middle"),
])
def test_the_readme_shows_the_examples_code(heading, example, class_name):
    source = (REPO_ROOT / "examples" / example).read_text()
    assert code(readme_example(heading), class_name) == code(source, class_name)


# --- simple_pipeline.py and routed_pipeline.py, run by zroute serve ------------------------


@pytest.mark.timeout(40)
def test_the_simple_pipeline_streams_the_seeds_lines_sleep_time_apart(stack):
    url = serve(stack, "simple_pipeline.py", "--Backend.sleep_time=0.3")
    started = time.monotonic()
    arrivals = asyncio.run(timed_chunks(url, SEED_TEXT))
    assert "".join(chunk for _, chunk in arrivals) == SEED_OUTPUT
    # Each line comes once it is made, about sleep_time after the one before.
    assert arrivals[0][0] - started >= 0.25
    assert all(0.25 <= gap < 1.5 for gap in gaps(arrivals)), gaps(arrivals)


@pytest.mark.timeout(40)
def test_the_simple_pipeline_with_the_seeds_config_round_robins_and_refuses_a_body_without_text(stack):
    url = serve(stack, "simple_pipeline.py", "-f", CONFIG, "--Backend.sleep_time=0.01")
    check_round_robin(url)
    status, body = post(url, {"txt": "sun"})
    assert (status, orjson.loads(body)["code"]) == (400, "bad_request")


@pytest.mark.timeout(40)
def test_the_routed_pipeline_round_robins_calls_a_named_worker_and_picks_the_least_loaded(stack):
    url = serve(stack, "routed_pipeline.py", "-f", CONFIG, "--Backend.sleep_time=0.01")
    check_round_robin(url)
    for _ in range(2):  # a direct call: that worker, never another
        assert post(url, {"text": "sun", "worker": "Backend-2"}) == (200, "Goodnight sun!\n")
    wait_completed(url, {"Backend-1": 2, "Backend-2": 4})
    status, body = post(url, {"text": "sun", "worker": "Backend-9"})
    assert (status, orjson.loads(body)["code"]) == (404, "no_such_worker")

    async def best_while_one_worker_is_busy() -> tuple[str, str]:
        async with aiohttp.ClientSession() as session:
            long = asyncio.ensure_future(timed_chunks(url, ",".join(["long"] * 100)))
            stats = await async_wait_until(
                lambda: (stats := get_json(f"{url}/stats"))["broker"]["inflight"] == 1 and stats,
                5, "the long request to be in flight")
            [busy] = [w["id"] for w in stats["workers"] if w["inflight"]]
            async with session.post(f"{url}/generate/best", json={"text": "sun"}) as reply:
                body = await reply.text()
            await long
            return busy, body

    before = completed(url)
    busy, body = asyncio.run(best_while_one_worker_is_busy())
    assert body == "Goodnight sun!\n"
    # select_best_worker chose the other worker, the one with nothing in flight.
    [idle] = set(before) - {busy}
    wait_completed(url, {busy: before[busy] + 1, idle: before[idle] + 1})


@pytest.mark.timeout(40)
def test_the_routed_pipeline_routes_at_random_when_its_config_says_so(stack):
    url = serve(stack, "routed_pipeline.py", "-f", CONFIG, "--Frontend.routing_mode=random",
                "--Backend.sleep_time=0")
    assert "Frontend routes to Backend by random" in stack.procs[0].output()
    for _ in range(16):
        assert post(url, {"text": "sun,moon,stars"}) == (200, GOODNIGHT_OUTPUT)
    # Both workers served some (all 16 on one: a chance of 1 in 32,768).
    wait_until(lambda: sum(completed(url).values()) == 16, 5, "16 completed requests")
    assert all(count > 0 for count in completed(url).values()), completed(url)


# --- multistage_pipeline.py, its processes one by one -----------------------------------


class Multistage:
    """The multistage pipeline's broker, Backend worker, Middle workers and gateway."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.middles: list[Proc] = []
        stack.cwd = REPO_ROOT
        stack.broker()
        stack.worker("Backend-1", "--graph", MULTISTAGE, "--service-class", "Backend",
                     sleep_time=0.5)
        self.add_middle()
        self.add_middle()
        self.url = start_gateway(stack, "--service-class", MULTISTAGE).url
        stack.wait_workers("Backend-1", "Middle-1", "Middle-2", timeout=20)

    def add_middle(self) -> Proc:
        worker_id = f"Middle-{len(self.middles) + 1}"
        self.middles.append(self.stack.worker(
            worker_id, "--graph", MULTISTAGE, "--service-class", "Middle",
            f"--Broker.frontend={self.stack.frontend}", sleep_time=0.5))
        return self.middles[-1]

    def live_middles(self) -> list[Proc]:
        return [proc for proc in self.middles if proc.alive]

    async def busy_middle(self) -> Proc:
        """The Middle worker that holds a request, once one does."""
        def find() -> Proc | None:
            busy = [w["id"] for w in self.stack.stats()["workers"]
                    if w["id"].startswith("Middle") and w["inflight"]]
            return next((proc for proc in self.middles if proc.name in busy), None)
        return await async_wait_until(find, 5, "a Middle worker to hold the request")

    def replace(self, killed: Proc) -> None:
        """Another Middle worker in place of `killed`: two again for the next test."""
        wait_until(lambda: killed.name not in self.stack.ready_workers(), 5,
                   f"{killed.name} to be evicted")
        new = self.add_middle()
        self.stack.wait_workers(new.name, timeout=20)


@pytest.fixture(scope="module")
def multistage(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("multistage"))
    yield Multistage(stack)
    stack.close()


@pytest.mark.timeout(30)
def test_the_middle_stage_transforms_each_chunk_as_it_arrives(multistage):
    arrivals = asyncio.run(timed_chunks(multistage.url, "a,b,c"))
    assert [chunk for _, chunk in arrivals] == ["1. Hello a!\n", "2. Hello b!\n",
                                                "3. Hello c!\n"]
    # Backend makes a line every 0.5 s: each numbered line reached the HTTP client
    # before Backend had made the next.
    assert all(gap >= 0.4 for gap in gaps(arrivals)), gaps(arrivals)


@pytest.mark.timeout(30)
def test_a_line_larger_than_max_reply_buffer_passes_every_stage(multistage):
    """263,000 characters: one chunk over Frontend.max_reply_buffer (256 KiB) at each stage."""
    text = "x" * 263_000
    status, body = post(multistage.url, {"text": text})
    assert (status, body) == (200, f"1. Hello {text}!\n")


@pytest.mark.timeout(30)
def test_a_middle_worker_killed_before_its_first_chunk_is_replaced_by_the_other(multistage):
    async def request_while_its_middle_dies() -> tuple[list[str], Proc]:
        reading = asyncio.ensure_future(timed_chunks(multistage.url, "a,b,c"))
        victim = await multistage.busy_middle()  # Backend sleeps 0.5 s before "a"
        victim.kill()
        return [chunk for _, chunk in await reading], victim

    chunks, victim = asyncio.run(request_while_its_middle_dies())
    assert chunks == ["1. Hello a!\n", "2. Hello b!\n", "3. Hello c!\n"]
    multistage.replace(victim)


@pytest.mark.timeout(30)
def test_a_middle_worker_killed_mid_stream_ends_the_http_stream_with_an_error(multistage):
    async def request_whose_middle_dies_after_a_line() -> tuple[list[str], HttpStreamError, Proc]:
        received: list[str] = []
        async with aiohttp.ClientSession() as session:
            chunks = generate(session, multistage.url, {"text": "a,b,c"}, accept=NDJSON)
            received.append(await chunks.__anext__())
            victim = await multistage.busy_middle()
            victim.kill()
            with pytest.raises(HttpStreamError) as error:
                async for chunk in chunks:
                    received.append(chunk)
        return received, error.value, victim

    received, error, victim = asyncio.run(request_whose_middle_dies_after_a_line())
    assert received == ["1. Hello a!\n"]
    assert error.code == "worker_lost", error
    multistage.replace(victim)
