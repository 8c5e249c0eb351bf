"""Several brokers at once, with real processes: losing one of two with requests in flight,
a worker's capacity across both, and `zroute serve` running two."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import orjson
import pytest

from scripts.children import free_port
from tests.http_support import get_json, http, start_gateway
from tests.support import (REPO_ROOT, Proc, Stack, async_wait_until, run_zroute,
                           wait_until)
from tests.test_faults import collect
from tests.test_serve import Serve
from zroute.client import ANSWER_MARGIN_S, BlockingClient, BrokerError, Client

THREE_WORDS = {"text": "a,b,c"}
THREE_LINES = [b"Hello a!\n", b"Hello b!\n", b"Hello c!\n"]


class TwoBrokers:
    """Two brokers on free ports, each with its `broker_args`, and workers registered
    with both."""

    def __init__(self, stack: Stack, broker_args: tuple[tuple[str, ...], ...] = ((), ())) -> None:
        self.stack = stack
        self.frontends = [stack.frontend, f"tcp://127.0.0.1:{free_port()}"]
        self.backends = [stack.backend, f"tcp://127.0.0.1:{free_port()}"]
        self.broker_args = broker_args
        self.brokers = [self.start_broker(i) for i in range(2)]

    def start_broker(self, index: int) -> Proc:
        return self.stack.start(f"broker-{index + 1}", "broker", "--frontend",
                                self.frontends[index], "--backend", self.backends[index],
                                *self.broker_args[index])

    def worker(self, worker_id: str, *args: str) -> Proc:
        brokers = [flag for backend in self.backends for flag in ("--broker", backend)]
        return self.stack.start(worker_id, "worker", *brokers, "--id", worker_id, *args)

    def ready_on(self, index: int) -> int:
        """The workers ready on one broker."""
        return self.stats_of(index)["broker"]["workers_ready"]

    def stats_of(self, index: int) -> dict:
        with BlockingClient(self.frontends[index]) as client:
            return client.stats(timeout=5)

    def wait_workers(self, *ids: str) -> None:
        """Until every broker has the workers `ids` ready."""
        def ready() -> bool:
            with BlockingClient(self.frontends) as client:
                stats = client.stats(timeout=5)
            return all(b["reachable"] and b["workers_ready"] >= len(ids)
                       for b in stats["brokers"])
        wait_until(ready, 10, f"workers {ids} on both brokers")


def peak_of(worker: Proc) -> int:
    """Stop a worker: the most requests it ran at once, as it logs on exit (0 if it did not)."""
    worker.stop()
    peak = re.search(r"stopped after \d+ request\(s\), at most (\d+) at once", worker.output())
    return int(peak[1]) if peak else 0


@pytest.mark.timeout(90)
def test_kill_9_one_of_two_brokers_with_200_requests_in_flight_and_steady_load(stack):
    two = TwoBrokers(stack)
    for worker_id in ("w1", "w2", "w3"):
        two.worker(worker_id, "--Backend.sleep_time=0.3")
    two.wait_workers("w1", "w2", "w3")
    steady: list[tuple[float, asyncio.Task]] = []  # (when it was sent, its outcome)

    async def steady_load(client: Client, stop: asyncio.Event) -> None:
        while not stop.is_set():
            steady.append((time.monotonic(), asyncio.create_task(
                collect(client.round_robin("generate", THREE_WORDS)))))
            await asyncio.sleep(0.05)

    async def scenario() -> tuple[list, float]:
        async with Client(two.frontends, timeout=30) as client:
            stop = asyncio.Event()
            load = asyncio.create_task(steady_load(client, stop))
            burst = []
            for _ in range(200):  # over about 1 s: some have no chunk yet at the kill
                burst.append(asyncio.create_task(collect(client.round_robin("generate",
                                                                            THREE_WORDS))))
                await asyncio.sleep(0.005)
            two.brokers[0].kill()
            killed = time.monotonic()
            outcomes = await asyncio.wait_for(asyncio.gather(*burst), 20)  # none hangs
            two.brokers[0].popen.wait()
            two.brokers[0] = two.start_broker(0)
            # The restarted broker takes traffic again: its own stats count requests.
            await asyncio.to_thread(
                wait_until, lambda: two.stats_of(0)["broker"]["completed"] >= 5, 15,
                "the restarted broker to serve requests")
            stop.set()
            await load
            await asyncio.wait_for(asyncio.gather(*(task for _, task in steady)), 20)
            assert client.resent > 0  # requests without a chunk went through the other broker
            return outcomes, killed

    outcomes, killed = asyncio.run(scenario())
    completed = [chunks for chunks, error in outcomes if error is None]
    failed = [(chunks, error) for chunks, error in outcomes if error is not None]
    assert all(chunks == THREE_LINES for chunks in completed)
    assert failed, "the killed broker held streaming requests"
    for chunks, error in failed:  # only started streams fail, and they say so
        assert 0 < len(chunks) < 3 and error.code == "broker_unreachable", (chunks, error)
    after_kill = [task.result() for sent, task in steady if sent > killed]
    assert after_kill and all(error is None for _, error in after_kill)
    before = [task.result() for sent, task in steady if sent <= killed]
    assert all(error is None or (0 < len(chunks) < 3 and error.code == "broker_unreachable")
               for chunks, error in before)


@pytest.mark.timeout(60)
def test_a_worker_never_runs_more_than_its_capacity_with_two_brokers(stack):
    two = TwoBrokers(stack)
    capacities = (1, 2)
    workers = {f"w{i}": two.worker(f"w{i}", "--handler", "tests.handlers:hold", "--capacity",
                                   str(capacity))
               for i, capacity in enumerate(capacities, 1)}
    two.wait_workers(*workers)

    async def scenario() -> list:
        async with Client(two.frontends, timeout=30) as client:
            streams = [client.round_robin("generate", {"text": str(n), "seconds": 0.05})
                       for n in range(80)]
            return await asyncio.wait_for(asyncio.gather(*(s.read() for s in streams)), 30)

    replies = asyncio.run(scenario())
    assert replies == [f"start {n}\ndone {n}\n".encode() for n in range(80)]
    with BlockingClient(two.frontends) as client:
        refusals = client.stats()["broker"]["refusals"]
    for proc, capacity in zip(workers.values(), capacities):
        assert 1 <= peak_of(proc) <= capacity, proc.output()[-2000:]
    assert refusals > 0  # both brokers sent to the same workers: capacity was held by refusing


@pytest.mark.timeout(60)
def test_a_backlog_on_two_brokers_and_workers_of_capacity_1_all_succeed(stack):
    # Each broker sees both workers; each worker runs one request at a time, whichever
    # broker sent it. The backlog drains well within Broker.queue_timeout: no request
    # fails, however often the brokers race for a free slot.
    two = TwoBrokers(stack)
    workers = {worker_id: two.worker(worker_id, "--handler", "tests.handlers:hold",
                                     "--capacity", "1") for worker_id in ("w1", "w2")}
    two.wait_workers(*workers)
    backlog = 300

    async def scenario() -> list:
        async with Client(two.frontends, timeout=30) as client:
            streams = [client.round_robin("generate", {"text": str(n), "seconds": 0.005})
                       for n in range(backlog)]
            return await asyncio.wait_for(
                asyncio.gather(*(s.read() for s in streams), return_exceptions=True), 30)

    replies = asyncio.run(scenario())
    failures = [reply for reply in replies if isinstance(reply, Exception)]
    assert failures == []
    assert replies == [f"start {n}\ndone {n}\n".encode() for n in range(backlog)]
    for proc in workers.values():
        assert peak_of(proc) == 1, proc.output()[-2000:]


@pytest.mark.timeout(60)
def test_a_worker_refused_by_one_of_two_brokers_serves_through_the_other_and_asks_again(
        stack, tmp_path):
    two = TwoBrokers(stack, broker_args=((), ("--Broker.max_workers=1",)))
    first = stack.start("r1", "worker", "--broker", two.backends[1], "--id", "r1")
    wait_until(lambda: two.ready_on(1) == 1, 10, "r1 on the second broker")
    ready = tmp_path / "ready"
    second = two.worker("r2", "--ready-file", str(ready))
    wait_until(lambda: two.ready_on(0) == 1, 10, "r2 on the first broker")
    wait_until(lambda: "Broker.max_workers" in second.output(), 10, "the refusal in r2's log")
    wait_until(ready.exists, 5, "r2's ready file")
    assert ready.read_text() == f"{two.backends[0]}\n"  # ready: one broker has it
    with BlockingClient(two.frontends[0]) as client:
        assert client.round_robin("generate", THREE_WORDS).read() == b"".join(THREE_LINES)
    assert second.alive
    first.stop()  # room on the second broker: r2 asks again, and is taken
    wait_until(lambda: "registered with the broker at " + two.backends[1] in second.output(),
               15, "r2 registered with the second broker")
    assert two.ready_on(1) == 1
    wait_until(lambda: ready.read_text().count("\n") == 2, 5, "both brokers in the ready file")
    refusals = [line for line in second.output().splitlines() if "refused it" in line]
    assert len(refusals) == 1 and "going on with the other brokers" in refusals[0], refusals


@pytest.mark.timeout(60)
def test_a_worker_refused_by_every_broker_exits_saying_why(stack):
    two = TwoBrokers(stack, broker_args=(("--Broker.max_workers=1",),) * 2)
    two.worker("r1")
    two.wait_workers("r1")
    second = two.worker("r2")
    second.expect(2)
    assert second.wait() == 2
    errors = [line for line in second.output().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Broker.max_workers" in errors[0], errors


@pytest.mark.timeout(60)
def test_serve_runs_two_brokers_and_its_stats_show_both(stack):
    serve = Serve(stack, "--Broker.ServiceArgs.workers=2", "--Backend.sleep_time=0")
    serve.wait_ready()
    serve.wait_children("broker-1", "broker-2", "Backend-1", "gateway-1")
    for _ in range(4):
        assert http("POST", f"{serve.url}/generate", b'{"text": "a"}').body == b"Hello a!\n"
    stats = get_json(f"{serve.url}/stats")
    second = f"{stack.frontend.rpartition(':')[0]}:{int(stack.frontend.rpartition(':')[2]) + 2}"
    assert [(b["endpoint"], b["reachable"]) for b in stats["brokers"]] == [
        (stack.frontend, True), (second, True)]
    assert [b["requests"] for b in stats["brokers"]] == [2, 2]  # in turn
    assert stats["broker"]["requests"] == 4
    assert [(w["id"], w["brokers"], w["completed"]) for w in stats["workers"]] == [
        ("Backend-1", 2, 4)]
    assert get_json(f"{serve.url}/health") == {"status": "ok", "workers": 1, "brokers": 2,
                                               "unreachable": []}


@pytest.mark.timeout(60)
def test_a_broker_that_stops_hands_its_requests_without_a_chunk_to_the_other(stack):
    two = TwoBrokers(stack)
    two.worker("w1", "--handler", "tests.handlers:hold", "--capacity", "1")
    two.wait_workers("w1")

    async def scenario() -> tuple[list, int]:
        async with Client(two.frontends, timeout=30) as client:
            streams = [client.round_robin("generate", {"text": str(n), "seconds": 0.3})
                       for n in range(8)]  # one runs, the others wait on the two brokers
            await streams[0].first()
            two.brokers[0].stop()  # SIGTERM: it fails what it holds, and leaves
            outcomes = await asyncio.wait_for(asyncio.gather(*map(collect, streams)), 30)
            return outcomes, client.resent

    outcomes, resent = asyncio.run(scenario())
    assert resent > 0
    for n, (chunks, error) in enumerate(outcomes):
        if error is None:
            assert chunks == [f"start {n}\n".encode(), f"done {n}\n".encode()]
        else:  # only one that had begun on the stopped broker may fail
            assert len(chunks) == 1 and error.code == "broker_unreachable", (chunks, error)


@pytest.mark.timeout(60)
def test_serve_says_so_when_the_brokers_listed_leave_out_one_it_runs(stack):
    serve = Serve(stack, "--Broker.ServiceArgs.workers=2", "--Backend.sleep_time=0",
                  f"--Broker.frontends=[{stack.frontend}]", f"--Broker.backends=[{stack.backend}]")
    output = serve.wait_ready()
    warnings = [line for line in output.splitlines() if "lists no endpoint of" in line]
    assert [w.split("WARNING ")[1].split(" (")[0] for w in warnings] == [
        f"Broker.{key} lists no endpoint of broker-2" for key in ("frontends", "backends")]
    serve.proc.stop()


@pytest.mark.timeout(60)
def test_a_blocking_client_sends_new_requests_to_the_broker_left(stack):
    two = TwoBrokers(stack)
    two.worker("w1", "--Backend.sleep_time=0")
    two.wait_workers("w1")
    with BlockingClient(two.frontends, timeout=10) as client:
        assert [client.round_robin("generate", "a").read() for _ in range(2)] == [b"Hello a!\n"] * 2
        two.brokers[1].kill()
        two.brokers[1].popen.wait()
        assert [client.round_robin("generate", "b").read() for _ in range(4)] == [b"Hello b!\n"] * 4
        stats = client.stats(timeout=2)
    assert [b["reachable"] for b in stats["brokers"]] == [True, False]
    assert stats["broker"]["completed"] >= 5  # the first broker's, after the second died


@pytest.mark.timeout(60)
def test_health_metrics_and_zroute_stats_show_each_broker_and_the_one_that_is_down(stack):
    two = TwoBrokers(stack)
    two.worker("w1", "--Backend.sleep_time=0")
    two.wait_workers("w1")
    gateway = start_gateway(stack, "--broker", two.frontends[1], broker=two.frontends[0])
    both = {"status": "ok", "workers": 1, "brokers": 2, "unreachable": []}
    wait_until(lambda: get_json(f"{gateway.url}/health") == both, 10, "/health with both")
    for _ in range(4):
        assert http("POST", f"{gateway.url}/generate", b'{"text": "a"}').body == b"Hello a!\n"
    two.brokers[1].kill()
    one_down = {"status": "ok", "workers": 1, "brokers": 1, "unreachable": [two.frontends[1]]}
    wait_until(lambda: get_json(f"{gateway.url}/health") == one_down, 10,
               "/health to name the broker that is down")
    assert http("POST", f"{gateway.url}/generate", b'{"text": "b"}').body == b"Hello b!\n"
    metrics = http("GET", f"{gateway.url}/metrics").body.decode()
    assert f'zroute_broker_up{{broker="{two.frontends[0]}"}} 1.0' in metrics
    assert f'zroute_broker_up{{broker="{two.frontends[1]}"}} 0.0' in metrics
    assert f'zroute_broker_refusals_total{{broker="{two.frontends[0]}"}} 0.0' in metrics
    assert f'zroute_broker_refusals_total{{broker="{two.frontends[1]}"}}' not in metrics
    shown = run_zroute("stats", "--broker", two.frontends[0], "--broker", two.frontends[1],
                       "--timeout", "2")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:3] == ["WORKER", "SERVICES", "STATE"]
    assert lines[1].split()[:3] == ["w1", "generate", "ready"]
    assert lines[-3].startswith(f"{two.frontends[0]}: up ")
    assert lines[-2].startswith(f"{two.frontends[1]}: unreachable (no answer from the broker")
    assert lines[-1].startswith("total: up ") and " completed 3 " in lines[-1]


@pytest.mark.timeout(60)
def test_a_second_serve_of_two_brokers_is_told_ports_where_both_are_free(stack):
    first = Serve(stack, "--Broker.ServiceArgs.workers=2", "--Backend.sleep_time=0")
    first.wait_ready()
    second = run_zroute("serve", "--port", str(free_port()), "--Broker.ServiceArgs.workers=2",
                        f"--Broker.frontend={stack.frontend}", f"--Broker.backend={stack.backend}")
    assert second.returncode == 1, second.stderr
    hint = re.fullmatch(r".*; to run a second stack, give it other ports too: "
                        r"--Broker.frontend=tcp://127.0.0.1:(\d+) "
                        r"--Broker.backend=tcp://127.0.0.1:(\d+)\n", second.stderr, re.S)
    assert hint, second.stderr
    front, back = int(hint[1]), int(hint[2])
    assert back == front + 1
    taken = {int(endpoint.rpartition(":")[2]) for endpoint in (stack.frontend, stack.backend)}
    assert not {front, front + 1, front + 2, front + 3} & {port + step for port in taken
                                                           for step in (0, 2)}


@pytest.mark.timeout(60)
def test_a_broker_that_hangs_gets_no_new_request_after_a_missed_heartbeat(stack):
    two = TwoBrokers(stack)
    two.worker("w1", "--Backend.sleep_time=0")
    two.wait_workers("w1")

    async def scenario() -> int:
        async with Client(two.frontends, timeout=30) as client:
            await asyncio.gather(*(client.round_robin("generate", "a").read() for _ in range(4)))
            two.brokers[1].signal(signal.SIGSTOP)  # its connections stay open
            stopped = time.monotonic()
            try:
                # Both brokers answered their last heartbeat: one of these goes to each.
                early = [client.round_robin("generate", "b") for _ in range(2)]
                # Left once it misses a heartbeat: within an interval and ANSWER_MARGIN_S
                # (and what the test's own loop adds).
                await async_wait_until(
                    lambda: not client.brokers[1].fresh(client.heartbeat_interval), 3,
                    "the hung broker to miss a heartbeat")
                bound = client.heartbeat_interval + ANSWER_MARGIN_S + 0.2
                assert time.monotonic() - stopped < bound
                replies = await asyncio.wait_for(asyncio.gather(
                    *(client.round_robin("generate", "c").read() for _ in range(6))), 3)
                assert replies == [b"Hello c!\n"] * 6  # none went to the hung broker
                # The one it holds goes elsewhere once it has missed 3 heartbeats.
                assert await asyncio.wait_for(asyncio.gather(*(s.read() for s in early)),
                                              5) == [b"Hello b!\n"] * 2
                assert client.resent == 1
            finally:
                two.brokers[1].signal(signal.SIGCONT)
            # Back, it answers its heartbeat, and takes its turn again.
            await async_wait_until(lambda: client.brokers[1].fresh(client.heartbeat_interval),
                                   5, "the broker to answer again")
            before = two.stats_of(1)["broker"]["completed"]
            await asyncio.gather(*(client.round_robin("generate", "d").read() for _ in range(4)))
            return two.stats_of(1)["broker"]["completed"] - before

    assert asyncio.run(scenario()) == 2


@pytest.mark.timeout(60)
def test_a_service_lists_each_worker_of_its_dependency_once_with_two_brokers(stack):
    stack.cwd = REPO_ROOT
    two = TwoBrokers(stack)
    both = [f"--Broker.frontends=[{', '.join(two.frontends)}]",
            f"--Broker.backends=[{', '.join(two.backends)}]"]
    for worker_id, name in (("Backend-1", "Backend"), ("Backend-2", "Backend"),
                            ("Middle-1", "Middle")):
        two.worker(worker_id, "--graph", "tests/services.py:Frontend", "--service-class", name,
                   "--capacity", "3", *both)
    two.wait_workers("Backend-1", "Backend-2", "Middle-1")
    with BlockingClient(two.frontends[1], timeout=10) as client:
        listed = orjson.loads(client.request("Middle.workers", b"null").read())
    assert listed["workers"] == [["Backend-1", 0, 3], ["Backend-2", 0, 3]]
    assert listed["chose"] == listed["served"] == "Backend-1"
