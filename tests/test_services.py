"""Services as classes (zroute/services.py): the graph walk and its checks, each service's
config section, and a graph of tests/services.py run by real workers, called through the
broker: streaming across two stages, routing per call, encoding, errors, cancellation and
the lifecycle hooks; then `zroute serve FILE:Class`."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Optional

import aiohttp
import orjson
import pytest

from tests import services
from tests.handlers import CANCELLED_LINE
from tests.http_support import async_test
from tests.support import (REPO_ROOT, Stack, free_port, run_zroute, wait_until,
                           workers_by_id)
from zroute import api, depends, endpoint, service
from zroute.client import BlockingClient, BrokerError
from zroute.services import GraphError, walk
from zroute_cli.config import ConfigError, load_config

GRAPH = "tests/services.py:Frontend"


# --- the graph ---------------------------------------------------------------------------


def test_a_graph_lists_each_service_once_with_those_it_depends_on_first():
    graph = walk(services.Frontend)
    assert [s.name for s in graph.services] == ["Backend", "Middle", "Frontend"]
    assert [s.name for s in graph.worker_services] == ["Backend", "Middle"]
    backend, middle, frontend = graph.services
    assert {e.name for e in backend.endpoints.values()} == {
        "Backend.generate", "Backend.echo", "Backend.ready", "Backend.refuse", "Backend.values",
        "Backend.binary", "Backend.unencodable", "Backend.hang"}
    assert middle.dependencies == {"backend": backend}
    assert (frontend.is_http, list(frontend.routes)) == (True, [
        ("POST", "/shout"), ("POST", "/generate"), ("GET", "/generate"), ("POST", "/hang")])
    assert frontend.routes["POST", "/shout"].forward == ("middle", "generate")
    assert [(s.name, s.default) for s in backend.settings] == [
        ("greeting", "Hello"), ("sleep_time", 0.0), ("started", False)]
    assert backend.hooks == {"on_start": ["setup"], "on_stop": ["teardown"]}


def graph_error(root: object) -> str:
    with pytest.raises(GraphError) as info:
        walk(root)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_each_mistake_in_a_graph_is_one_line_naming_the_class():
    class Plain:
        pass

    @service
    class A:
        @endpoint
        async def run(self, request):
            yield request

    @service
    class B:
        a = depends(A)

        @endpoint
        async def run(self, request):
            yield request

    A.b = depends(B)  # after the fact: a cycle
    assert graph_error(B) == ("the services depend on each other in a cycle: B -> A -> B; "
                              "a graph must have none")
    assert graph_error(Plain) == "the class Plain is not a service: mark the class with @service"

    @service
    class NeedsPlain:
        plain = depends(Plain)

        @endpoint
        async def run(self, request):
            yield request

    assert graph_error(NeedsPlain) == ("NeedsPlain.plain = depends(the class Plain): a "
                                       "dependency is a class marked @service")

    @service
    class TwoRoutes:
        @api(path="/a")
        async def first(self, request):
            yield "1"

        @api(path="/a")
        async def second(self, request):
            yield "2"

    assert graph_error(TwoRoutes) == ("TwoRoutes: the route POST /a is declared twice, by "
                                      "first and second: give each its own path or method")

    @service
    class NotAsync:
        @endpoint
        def run(self, request):
            return request

    assert graph_error(NotAsync) == (
        "NotAsync.run: an endpoint is an async def (with yield to stream its chunks, or "
        "returning its one chunk), not a plain function")

    @service
    class NoArgument:
        @endpoint
        async def run(self):
            return "x"

    assert graph_error(NoArgument) == ("NoArgument.run: an endpoint takes one argument besides "
                                       "self, the request")

    @service
    class Both:
        @api(path="/a")
        async def page(self, request):
            yield "1"

        @endpoint
        async def run(self, request):
            yield "2"

    assert graph_error(Both).startswith("Both has both @api routes and @endpoints: ")

    @service
    class Idle:
        pass

    assert graph_error(Idle) == "Idle has no @endpoint and no @api route: nothing would serve it"

    @service
    class Configured:
        def __init__(self, model):
            self.model = model

        @endpoint
        async def run(self, request):
            yield request

    assert graph_error(Configured) == (
        "Configured.__init__ takes arguments besides self, but zroute creates the instance "
        "with none: make them settings (annotated attributes) or give them defaults")

    @service
    class SameName:
        a = depends(A)

        @endpoint(name="A.run")
        async def run(self, request):
            yield request

    del A.b
    assert graph_error(SameName) == ("SameName.run and A.run both register as 'A.run' with the "
                                     "broker: give one another @endpoint(name=...)")


# --- configuration -----------------------------------------------------------------------


def config_error(graph_root: type, overrides: tuple[str, ...] = (), path: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, walk(graph_root))
    return str(info.value)


def test_each_service_has_a_section_of_its_keys_and_its_process_kinds(tmp_path: Path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("Backend:\n  greeting: Hi\nMiddle:\n  drain_timeout: 5\n"
                           "Frontend:\n  port: 9000\n")
    config = load_config(str(config_file), ["Backend.sleep_time=0.5"], walk(services.Frontend))
    assert (config.backend.greeting, config.backend.sleep_time) == ("Hi", 0.5)
    assert config.backend.service_args.workers == 2  # @service(workers=2)
    assert (config.middle.drain_timeout, config.middle.routing_mode) == (5.0, "round_robin")
    assert (config.frontend.port, config.frontend.service_args.workers) == (9000, 1)
    assert config.as_dict()["Broker"]["frontend"] == "tcp://127.0.0.1:5555"


@pytest.mark.parametrize("overrides, message", [
    (("Backend.greting=Hi",),
     "unknown key 'Backend.greting' (did you mean Backend.greeting? valid keys: greeting, "
     "sleep_time, started, drain_timeout, expose_errors, curve_key, ServiceArgs)"),
    (("Backend.sleep_time=soon",), "Backend.sleep_time: 'soon' is invalid: must be a number"),
    (("Frontend.greeting=Hi",), "unknown key 'Frontend.greeting' (valid keys: routing_mode, "
                                "host, port, max_body, request_timeout, drain_timeout, "
                                "header_timeout, body_timeout, keepalive_timeout, send_timeout, "
                                "max_connections, max_buffered_bytes, max_reply_buffer, "
                                "max_queued_messages, admin_host, admin_port, "
                                "stats_feed_interval, max_stats_feeds, expose_errors, curve_key, "
                                "tls_cert, tls_key, ServiceArgs)"),
    (("Shouter.greeting=Hi",),
     "unknown section 'Shouter' (valid sections: Backend, Middle, Frontend, Broker)"),
], ids=["unknown-key", "wrong-type", "key-of-another-kind", "not-in-the-graph"])
def test_a_bad_key_of_a_service_is_one_line_naming_it(overrides, message):
    assert config_error(services.Frontend, overrides) == message


def test_a_worker_service_that_calls_others_has_a_routing_mode():
    config = load_config(None, ["Middle.routing_mode=random"], walk(services.Frontend))
    assert config.middle.routing_mode == "random"
    assert "routing_mode" not in config.as_dict()["Backend"]  # it calls nothing


def test_a_required_setting_without_a_value_is_named():
    assert config_error(services.NeedsModel) == (
        "NeedsModel.model is required and has no default: set it in the config file or with "
        "--NeedsModel.model=VALUE")
    assert load_config(None, ["NeedsModel.model=m"], walk(services.NeedsModel)).needsmodel.model == "m"


def test_a_setting_of_a_type_no_key_can_have_is_named():
    @service
    class Counts:
        counts: dict[str, int] = {}

        @endpoint
        async def run(self, request):
            yield request

    assert config_error(Counts) == (
        "Counts.counts: a setting is a str, int, float, bool (each may be `X | None`), "
        "tuple[str, ...] or list[str], or a section, not a dict[str, int]")


@service
class Optionals:
    model: Optional[str] = None
    size: int | None = None
    names: list[str] = ["a"]

    @endpoint
    async def run(self, request):
        yield request


def test_optional_settings_take_null_and_lists_are_lists(tmp_path: Path):
    settings = load_config(None, (), walk(Optionals)).optionals
    assert (settings.model, settings.size, settings.names) == (None, None, ["a"])
    config_file = tmp_path / "config.yaml"
    config_file.write_text("Optionals:\n  model: m\n  size: 3\n  names: [b, c]\n")
    settings = load_config(str(config_file), (), walk(Optionals)).optionals
    assert (settings.model, settings.size, settings.names) == ("m", 3, ["b", "c"])
    settings = load_config(str(config_file), ("Optionals.model=null", "Optionals.size=null"),
                           walk(Optionals)).optionals
    assert (settings.model, settings.size) == (None, None)
    assert config_error(Optionals, ("Optionals.size=big",)) == (
        "Optionals.size: 'big' is invalid: must be an integer or null")


# --- a graph served by workers -----------------------------------------------------------


@pytest.fixture(scope="module")
def graph_stack(tmp_path_factory):
    """A broker, two Backend workers (capacity 3) and a Middle worker, of GRAPH."""
    stack = Stack(tmp_path_factory.mktemp("graph"))
    stack.cwd = REPO_ROOT
    stack.broker()
    for worker_id, name in (("Backend-1", "Backend"), ("Backend-2", "Backend"),
                            ("Middle-1", "Middle")):
        stack.worker(worker_id, "--graph", GRAPH, "--service-class", name, "--capacity", "3",
                     f"--Broker.frontend={stack.frontend}")
    stack.wait_workers("Backend-1", "Backend-2", "Middle-1", timeout=20)
    yield stack
    stack.close()


def call(stack: Stack, service_name: str, argument: object) -> str:
    with BlockingClient(stack.frontend, timeout=10) as client:
        return client.request(service_name, orjson.dumps(argument)).read().decode()


@pytest.mark.timeout(40)
def test_a_call_through_a_dependency_streams_each_chunk_as_the_callee_yields_it(graph_stack):
    with BlockingClient(graph_stack.frontend, timeout=10) as client:
        stream = client.request("Middle.generate", orjson.dumps("a,b,c"))
        assert list(stream) == [b"HELLO A!\n", b"HELLO B!\n", b"HELLO C!\n"]
        assert stream.worker_id == "Middle-1"


@pytest.mark.timeout(30)
def test_a_call_chooses_its_routing_or_its_worker(graph_stack):
    served = {call(graph_stack, "Middle.route", {"policy": "round_robin"}) for _ in range(4)}
    assert served == {"Backend-1", "Backend-2"}
    assert {call(graph_stack, "Middle.route", {"worker": "Backend-2"}) for _ in range(3)} == {
        "Backend-2"}
    assert call(graph_stack, "Middle.route", {"policy": "random"}) in ("Backend-1", "Backend-2")
    listed = orjson.loads(call(graph_stack, "Middle.workers", None))
    assert listed["workers"] == [["Backend-1", 0, 3], ["Backend-2", 0, 3]]
    assert listed["chose"] == listed["served"] == "Backend-1"


@pytest.mark.timeout(30)
def test_a_call_without_a_policy_takes_the_section_s_routing_mode(graph_stack):
    """Middle declares no routing_mode: its section's, as the command line sets it."""
    spreading = graph_stack.start("spreading", "worker", "--broker", graph_stack.backend,
                                  "--graph", GRAPH, "--service-class", "Middle",
                                  "--Middle.routing_mode=random",
                                  f"--Broker.frontend={graph_stack.frontend}")
    ids = wait_until(lambda: set(graph_stack.ready_workers()) - {"Middle-1", "Backend-1",
                                                                 "Backend-2"}, 10,
                     "the worker to register")
    [own_id] = ids  # without --id: its service's name, and random hex digits
    assert re.fullmatch(r"Middle-[0-9a-f]{6}", own_id)
    with BlockingClient(graph_stack.frontend, timeout=10) as client:
        served = [client.request("Middle.route", b"{}", policy="direct", worker=own_id)
                  .read().decode() for _ in range(24)]
    spreading.stop()
    graph_stack.procs.remove(spreading)
    assert set(served) == {"Backend-1", "Backend-2"}
    assert any(served[n] == served[n + 1] for n in range(len(served) - 1))  # not in turn


@pytest.mark.timeout(30)
def test_many_concurrent_workers_calls_share_one_stats_request(graph_stack):
    """The broker answers one client's STATS once per Broker.stats_interval and refuses
    past 100 waiting: the calls of a process share theirs."""
    assert call(graph_stack, "Middle.workers_at_once", 300) == "[2]"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argument, received", [
    ("123", 'str "123"'), ("a,b", 'str "a,b"'), ({"text": "a"}, 'dict {"text":"a"}'),
    (5, "int 5"), (2.5, "float 2.5"), ([1, "x"], 'list [1,"x"]'), (None, "NoneType null"),
])
def test_an_endpoint_receives_exactly_what_its_caller_passed(graph_stack, argument, received):
    assert call(graph_stack, "Middle.echo", argument) == received


@pytest.mark.timeout(30)
def test_an_endpoint_may_yield_any_json_value_and_its_caller_reads_the_values(graph_stack):
    with BlockingClient(graph_stack.frontend, timeout=10) as client:
        assert list(client.request("Backend.values", orjson.dumps({"a": 1}))) == [
            b'{"a":1}', b'[1,"x"]', b"2.5", b"true"]
    assert orjson.loads(call(graph_stack, "Middle.values", {"a": 1})) == {
        "values": [{"a": 1}, [1, "x"], 2.5, True]}


@pytest.mark.timeout(30)
def test_a_value_json_cannot_carry_fails_naming_the_endpoint_and_its_type(graph_stack):
    with BlockingClient(graph_stack.frontend, timeout=10) as client:
        with pytest.raises(BrokerError) as raised:
            client.request("Backend.unencodable", b"null").read()
    assert raised.value.code == "handler_error"
    line = ("the handler 'Backend.unencodable' yielded a set, which is not str, bytes or a "
            "value JSON can carry")
    wait_until(lambda: any(line in proc.output() for proc in graph_stack.procs), 5,
               "the worker's log line")
    for proc in graph_stack.procs:
        proc.traceback_expected |= line in proc.output()  # the handler's mistake, logged


@pytest.mark.timeout(30)
def test_a_middle_stage_relays_binary_chunks_unchanged(graph_stack):
    with BlockingClient(graph_stack.frontend, timeout=10) as client:
        assert list(client.request("Middle.binary", b"null")) == [b"\xff\xfe", b"\x00\x80ok"]


@pytest.mark.timeout(30)
def test_a_callees_error_reaches_its_caller_with_its_code(graph_stack):
    assert call(graph_stack, "Middle.refused", "no words") == "bad_request: no words"


@pytest.mark.timeout(30)
def test_a_callees_error_that_its_caller_lets_through_reaches_the_next_caller(graph_stack):
    with BlockingClient(graph_stack.frontend, timeout=10) as client:
        with pytest.raises(BrokerError) as raised:
            client.request("Middle.passes_on", orjson.dumps("no words")).read()
    assert raised.value.code == "bad_request"
    assert raised.value.message == "a call it made failed: no words"


@pytest.mark.timeout(30)
def test_a_calls_timeout_reaches_the_next_caller_as_that_calls_not_its_own(graph_stack):
    with BlockingClient(graph_stack.frontend, timeout=10) as client:
        stream = client.request("Middle.relay_hang_briefly", orjson.dumps("brief"))
        assert next(stream) == b"first\n"
        with pytest.raises(BrokerError) as raised:
            stream.read()
    assert raised.value.code == "handler_error"  # a timeout would name the client's 10 s
    assert raised.value.message == ("a call it made failed: no reply within the request's "
                                    "timeout (0.5 s)")


@pytest.mark.timeout(30)
def test_a_cancelled_caller_cancels_its_callee(graph_stack):
    with BlockingClient(graph_stack.frontend, timeout=10) as client:
        stream = client.request("Middle.relay_hang", orjson.dumps("gone"))
        assert next(stream) == b"first\n"
        busy = graph_stack.wait_stats(
            lambda stats: sum(w["inflight"] for w in stats["workers"]) == 2, 5,
            "Middle and a Backend to hold the request")
        [callee] = [w["id"] for w in busy["workers"]
                    if w["id"].startswith("Backend") and w["inflight"]]
        stream.cancel()
        graph_stack.wait_stats(lambda stats: workers_by_id(stats)[callee]["inflight"] == 0, 5,
                               "the callee's request to end")
    backend = next(proc for proc in graph_stack.procs if proc.name == callee)
    wait_until(lambda: CANCELLED_LINE.format(marker="gone") in backend.output(), 5,
               "the callee's handler to be cancelled")


@pytest.mark.timeout(30)
def test_the_start_hook_runs_before_the_first_request_and_the_stop_hook_on_drain(graph_stack):
    assert call(graph_stack, "Backend.ready", None) == "started=True"
    late = graph_stack.worker("Backend-3", "--graph", GRAPH, "--service-class", "Backend")
    graph_stack.wait_workers("Backend-3")
    assert call(graph_stack, "Backend.generate", "x") in ("Hello x!\n",)
    late.stop()
    output = late.output()
    started = output.index("Backend STARTED")
    assert started < output.index("registering with")
    assert output.index("stopped after") < output.index("Backend STOPPED after")
    graph_stack.procs.remove(late)


def test_a_start_hook_that_raises_stops_the_worker_with_one_line_naming_it():
    result = run_zroute("worker", "--service-class", "tests/services.py:FailsToStart",
                        "--broker", f"tcp://127.0.0.1:{free_port()}", cwd=REPO_ROOT)
    assert (result.returncode, result.stdout) == (3, "")
    assert result.stderr.splitlines()[-1] == (
        "zroute worker: error: FailsToStart.setup raised ValueError: no model at /models/x")


@pytest.mark.parametrize("argv, error", [
    (("serve", "tests/services.py:STARTED_LINE"),
     "the graph 'tests/services.py:STARTED_LINE': the str '{name} STARTED' is not a "
     "service: mark the class with @service"),
    (("worker", "--service-class", "tests/services.py:Frontend"),
     "--service-class: Frontend has @api routes: the gateway serves it (`zroute gateway "
     "--service-class`); a worker runs a class with endpoints"),
    (("worker", "--graph", GRAPH, "--service-class", "Nope"),
     "--service-class: no service named 'Nope' in the graph of Frontend (its services: "
     "Backend, Middle, Frontend)"),
    (("serve", "tests/services.py:Middle"),
     "Middle has no @api routes: serve runs a graph from the class that the gateway serves; "
     "run a service of endpoints alone with `zroute worker --service-class`"),
    (("serve", "tests/services.py:NoSuchClass"),
     "the graph 'tests/services.py:NoSuchClass' cannot be loaded: 'tests/services.py' has no "
     "attribute 'NoSuchClass'"),
    (("stats", "--graph", "tests/services.py:Middle"),
     "--graph: Middle has no @api routes: name the root of the graph, whose section holds "
     "the gateway's curve_key"),
    (("serve", GRAPH, "--Middle.routing_mode=bogus"),
     "Middle.routing_mode: unknown routing policy 'bogus' (valid: round_robin, random, "
     "least_loaded, power_of_two)"),
], ids=["not-a-service", "worker-of-routes", "not-in-graph", "serve-of-endpoints",
        "does-not-load", "stats-of-endpoints", "unknown-routing-mode"])
def test_a_graph_that_cannot_run_is_one_line_before_anything_starts(argv, error):
    result = run_zroute(*argv, f"--Broker.frontend=tcp://127.0.0.1:{free_port()}",
                        cwd=REPO_ROOT)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"zroute {argv[0]}: error: {error}\n")


# --- zroute serve FILE:Class -------------------------------------------------------------


def serve_args(stack: Stack, port: int, *args: str) -> tuple[str, ...]:
    return ("serve", *args, "--port", str(port), f"--Broker.frontend={stack.frontend}",
            f"--Broker.backend={stack.backend}")


@pytest.mark.timeout(60)
@async_test
async def test_serve_runs_a_graph_from_its_http_root_and_stops_callers_first(stack):
    stack.cwd = REPO_ROOT
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = stack.start("serve", *serve_args(stack, port, GRAPH, "--Backend.ServiceArgs.workers=1"))
    wait_until(lambda: "\nTry:\n" in serve.output(), 30, "serve to announce itself")
    assert (f"zroute is serving on {url} (Frontend; workers: 1 Backend, 1 Middle)"
            in serve.output())
    # The banner's example of each route follows its method.
    assert f"  curl -X POST {url}/generate -H 'Content-Type: application/json'" in serve.output()
    assert f"  curl '{url}/generate?key=value'\n" in serve.output()
    async with aiohttp.ClientSession() as session:
        # A route of the class, run in the gateway: Frontend -> Middle -> Backend.
        async with session.post(f"{url}/generate", json={"text": "sun,moon"}) as response:
            assert response.status == 200
            assert [line async for line in response.content] == [b"HELLO SUN!\n",
                                                                  b"HELLO MOON!\n"]
        # GET and POST share the path; the GET route receives the query.
        async with session.get(f"{url}/generate?text=a%20b&n=1") as response:
            assert (response.status, await response.json(content_type=None)) == (
                200, {"query": {"text": "a b", "n": "1"}})
        # A forward(): the body, as it comes, to Middle.generate, with ?worker=.
        async with session.post(f"{url}/shout?worker=Middle-1", json="sky") as response:
            assert (response.status, await response.text()) == (200, "HELLO SKY!\n")
            assert response.headers["X-Worker-Id"] == "Middle-1"
        # An HTTP client that leaves cancels the whole chain.
        async with session.post(f"{url}/hang", json={"marker": "http"}) as response:
            assert await response.content.readline() == b"first\n"
    wait_until(lambda: CANCELLED_LINE.format(marker="http") in serve.output(), 10,
               "the Backend's handler to be cancelled")
    serve.signal(signal.SIGTERM)
    assert serve.wait(20) == 0
    output = serve.output()
    # The caller drains before its callee, and both before the broker.
    assert (output.index("[Middle-1] INFO worker Middle-1 stopped")
            < output.index("[Backend-1] INFO worker Backend-1 draining")
            < output.index("[broker] INFO broker stopped")), output


@pytest.mark.timeout(40)
def test_serve_stops_with_one_line_when_a_start_hook_raises(stack):
    stack.cwd = REPO_ROOT
    serve = stack.start("serve", *serve_args(stack, free_port(),
                                             "tests/services.py:FailsToStartFront"))
    serve.expect(1)
    started = time.monotonic()
    serve.wait(30)
    output = serve.output()
    assert ("zroute worker: error: FailsToStart.setup raised ValueError: no model at "
            "/models/x") in output
    assert ("[serve] ERROR FailsToStart-1 exited with code 3 at start-up (its error is "
            "above); stopping") in output
    assert time.monotonic() - started < 20
