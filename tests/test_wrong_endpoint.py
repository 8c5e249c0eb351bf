"""Peers that speak to the wrong socket of the broker are told where to connect."""

from __future__ import annotations

import asyncio
import logging

import pytest

from zroute import protocol as p
from zroute.client import BrokerError, Client
from broker.core import WRONG_ENDPOINT_ANSWERS
from tests.broker_memory import MemoryBroker
from tests.http_support import async_test, get_json, http, start_gateway
from tests.support import Stack, run_zroute, wait_until
from worker.runtime import Worker
from zroute.settings import WorkerSettings, BrokerLink


@pytest.fixture
def memory():
    broker = MemoryBroker()
    yield broker
    broker.close()


def client_endpoint_message(frontend: str, backend: str) -> str:
    return (f"{frontend} is the broker's client endpoint (Broker.frontend); "
            f"workers connect to Broker.backend ({backend})")


def worker_endpoint_message(frontend: str, backend: str) -> str:
    return (f"{backend} is the broker's worker endpoint (Broker.backend); "
            f"clients connect to Broker.frontend ({frontend})")


# --- the broker's rules, in memory ------------------------------------------------------


def test_a_worker_on_the_client_socket_is_refused_and_not_registered(memory):
    settings = memory.broker.settings
    memory.from_client(b"w", p.encode_ready(p.Ready("w1", ["generate"], 0)))
    assert memory.to_client(b"w") == [p.Error(b"", p.E_WRONG_ENDPOINT, client_endpoint_message(
        settings.frontend, settings.backend))]
    assert memory.core.registry.by_id == {}


def test_a_client_on_the_worker_socket_gets_its_request_and_stats_failed(memory):
    settings = memory.broker.settings
    expected = worker_endpoint_message(settings.frontend, settings.backend)
    memory.from_worker(b"c", p.encode_request_to_broker(p.Request(b"r1", "generate", b"{}")))
    memory.from_worker(b"c", p.encode_stats_request(p.StatsRequest(b"s1")))
    assert memory.to_worker(b"c") == [p.Error(b"r1", p.E_WRONG_ENDPOINT, expected),
                                      p.Error(b"s1", p.E_WRONG_ENDPOINT, expected)]
    assert memory.core.requests == {}


def test_wrong_endpoint_answers_are_rate_limited_per_peer(memory):
    ready = p.encode_ready(p.Ready("w1", ["generate"], 0))
    for _ in range(3 * WRONG_ENDPOINT_ANSWERS):
        memory.from_client(b"flood", ready)
    memory.from_client(b"other", ready)
    assert len(memory.to_client(b"flood")) == WRONG_ENDPOINT_ANSWERS
    assert len(memory.to_client(b"other")) == 1


def test_a_heartbeat_on_the_worker_socket_still_asks_to_register(memory):
    # A worker's and a client's HEARTBEAT look alike; a worker whose broker restarted
    # needs the DISCONNECT that makes it register again.
    memory.from_worker(b"w", p.encode_heartbeat())
    assert memory.to_worker(b"w") == [p.Disconnect()]


# --- real processes -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_worker_pointed_at_the_client_endpoint_says_so_and_exits_2(stack: Stack):
    stack.broker()
    result = run_zroute("worker", "--broker", stack.frontend)
    expected = client_endpoint_message(stack.frontend, stack.backend)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[-1] == f"zroute worker: error: --broker: {expected}"
    assert sum(expected in line for line in lines[:-1]) == 1  # its log line


@pytest.mark.timeout(30)
@async_test
async def test_a_client_pointed_at_the_worker_endpoint_fails_with_wrong_endpoint(stack: Stack):
    stack.broker()
    expected = worker_endpoint_message(stack.frontend, stack.backend)
    async with Client(stack.backend, timeout=10) as client:
        with pytest.raises(BrokerError) as failed:
            await asyncio.wait_for(client.request("generate", {"text": "a"}).read(), 10)
        assert (failed.value.code, failed.value.message) == (p.E_WRONG_ENDPOINT, expected)
        with pytest.raises(BrokerError) as failed:
            await client.stats(timeout=5)
        assert (failed.value.code, failed.value.message) == (p.E_WRONG_ENDPOINT, expected)


@pytest.mark.timeout(40)
def test_a_gateway_pointed_at_the_worker_endpoint_says_so(stack: Stack):
    stack.broker()
    gateway = start_gateway(stack, broker=stack.backend)
    expected = worker_endpoint_message(stack.frontend, stack.backend)
    health = wait_until(lambda: (body := get_json(f"{gateway.url}/health"))
                        and body.get("error") == expected and body, 10,
                        "/health to name the wrong endpoint")
    assert health["status"] == "unavailable"
    reply = http("POST", f"{gateway.url}/generate", b'{"text": "a"}', timeout=10)
    assert reply is not None and reply.status >= 500
    assert reply.json() == {"error": expected, "code": p.E_WRONG_ENDPOINT}


@pytest.mark.timeout(30)
def test_zroute_stats_pointed_at_the_worker_endpoint_says_so(stack: Stack):
    stack.broker()
    result = run_zroute("stats", "--broker", stack.backend, "--timeout", "5")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("zroute stats: error: "
                             f"{worker_endpoint_message(stack.frontend, stack.backend)}\n")


CLIENT, WORKER = "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"  # the defaults


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args, message", [
    (("worker", "--broker", CLIENT),
     f"--broker {CLIENT} is the broker's client endpoint (Broker.frontend); zroute worker "
     f"connects to its worker endpoint, Broker.backend (default {WORKER})"),
    (("gateway", "--broker", WORKER),
     f"--broker {WORKER} is the broker's worker endpoint (Broker.backend); zroute gateway "
     f"connects to its client endpoint, Broker.frontend (default {CLIENT})"),
    (("stats", "--broker", WORKER),
     f"--broker {WORKER} is the broker's worker endpoint (Broker.backend); zroute stats "
     f"connects to its client endpoint, Broker.frontend (default {CLIENT})"),
    (("broker", "--backend", CLIENT),
     f"--backend {CLIENT} is already the broker's client endpoint (Broker.frontend): its "
     f"worker endpoint, Broker.backend, needs one of its own (default {WORKER})"),
    # Both set by the user: the configuration's own message.
    (("broker", "--frontend", "tcp://127.0.0.1:7", "--backend", "tcp://127.0.0.1:7"),
     "Broker.frontend (tcp://127.0.0.1:7) and Broker.backend (tcp://127.0.0.1:7) are the "
     "same endpoint: clients connect to Broker.frontend and workers to Broker.backend, so "
     f"each needs its own (by default {CLIENT} and {WORKER})"),
], ids=["worker", "gateway", "stats", "broker", "both-given"])
def test_a_default_endpoint_given_to_the_other_side_names_the_flag(args, message):
    # The user set one endpoint, with a flag: the message names it, not the default.
    result = run_zroute(*args, "--Frontend.port=1")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"zroute {args[0]}: error: {message}\n"


def test_a_worker_that_hears_something_else_than_zroute_says_so_once(caplog):
    # What a worker connected to the gateway's HTTP port receives: its 400 answers, again
    # and again.
    worker = Worker(WorkerSettings(), BrokerLink("tcp://127.0.0.1:8000"), "w1",
                    {"generate": lambda request: None})
    with caplog.at_level(logging.WARNING, "zroute.worker"):
        for _ in range(100):
            worker._on_message(worker.sessions[0],
                               [b"HTTP/1.1 400 Bad Request\r\n", b"Content-Length: 11"])
    assert [r.getMessage() for r in caplog.records] == [
        "worker w1 dropped a message that is not zroute's protocol (unsupported protocol "
        "version b'HTTP/1.1 400 Bad'): is tcp://127.0.0.1:8000 the broker's worker endpoint, "
        "Broker.backend?"]
