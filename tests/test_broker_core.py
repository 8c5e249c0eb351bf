"""The broker's rules, checked on its core alone: no sockets, and a clock the test moves.

Each rule is pinned at its boundary, so that a test fails if the rule changes by a
token; the state machine at the end drives random sequences of events and checks what
must always hold.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zroute import protocol as p
from broker.core import (DEADLINE_TICK, DRAIN_RATE_INTERVAL, FRESH_STATS, MAX_STATS_WAITING,
                         MAX_STATS_WAITING_PER_CLIENT, READER_SLACK,
                         WRONG_ENDPOINT_ANSWERS, DrainRate)
from broker.reports import MAX_REPORTERS, MAX_REPORTS_BYTES
from broker.policies import load_policies
from broker.registry import LATENCY_WINDOW, WorkerInfo
from tests.broker_memory import MemoryCore
from tests.support import returned_types

pytestmark = pytest.mark.timeout(30)

START = 1000.0  # what the core's clock reads when a test begins (MemoryCore's default)
QUIET = "Broker.heartbeat_interval=100"  # no worker falls silent within a test


def requests_to(memory: MemoryCore, worker: bytes) -> list[bytes]:
    """The client rids of the REQUESTs the broker would send a worker (taken)."""
    return [p.split_request_token(m.rid)[1] for m in memory.to_worker(worker)
            if type(m) is p.Request]


def tokens_to(memory: MemoryCore, worker: bytes) -> list[bytes]:
    """The request ids, as the worker sees them, of the REQUESTs it would be sent (taken)."""
    return [m.rid for m in memory.to_worker(worker) if type(m) is p.Request]


def end(memory: MemoryCore, worker: bytes, token: bytes) -> None:
    memory.from_worker(worker, p.encode_reply_from_worker(p.End(token)))


def holders(memory: MemoryCore) -> dict[bytes, list[bytes]]:
    """Which workers the broker would send REQUESTs to, and the client rids (taken)."""
    sent = {peer: requests_to(memory, peer) for peer in list(memory.core.to_workers)}
    return {peer: rids for peer, rids in sent.items() if rids}


def errors(memory: MemoryCore, client: bytes) -> dict[bytes, str]:
    """The codes of the ERRORs the broker would send a client, by rid (taken)."""
    return {m.rid: m.code for m in memory.to_client(client) if type(m) is p.Error}


def state_of(memory: MemoryCore, worker_id: str) -> str:
    return {w["id"]: w["state"] for w in memory.stats()["workers"]}[worker_id]


def queued(memory: MemoryCore) -> list[bytes]:
    return [r.rid for r in memory.core.queues.get("generate", ())]


# --- every message has a handler ----------------------------------------------------------

EVERY_MESSAGE = [
    p.encode_request_to_broker(p.Request(b"r", "s", b"{}")),
    p.encode_request_to_worker(p.Request(b"r", "s", b"{}")),
    p.encode_reply_from_worker(p.Chunk(b"r", [b"a"])),
    p.encode_reply_from_worker(p.End(b"r")),
    p.encode_reply_to_client(p.Chunk(b"r", [b"a"], "w1")),
    p.encode_reply_to_client(p.End(b"r", [], "w1")),
    p.encode_error(p.Error(b"r", p.E_HANDLER, "boom")),
    p.encode_cancel(p.Cancel(b"r")),
    p.encode_stats_request(p.StatsRequest(b"r")),
    p.encode_stats_reply(p.StatsReply(b"r", {})),
    p.encode_report(p.Report("g1", {})),
    p.encode_ready(p.Ready("w1", ["s"])),
    p.encode_heartbeat(),
    p.encode_heartbeat(p.Heartbeat(b"boot")),
    p.encode_disconnect(),
    p.encode_drain(),
]


@pytest.mark.parametrize("decode", [p.decode_from_client, p.decode_from_worker])
def test_a_decoder_returns_the_types_it_names(decode):
    decoded = set()
    for frames in EVERY_MESSAGE:
        try:
            decoded.add(type(decode(frames)))
        except p.ProtocolError:
            pass
    assert decoded == returned_types(decode)


def test_every_message_a_client_may_send_has_a_handler():
    assert set(MemoryCore().core.client_handlers) == returned_types(p.decode_from_client)


def test_every_message_a_worker_may_send_has_a_handler():
    # READY is the one message from a worker the broker does not know yet.
    handled = {p.Ready, *MemoryCore().core.worker_handlers}
    assert handled == returned_types(p.decode_from_worker)


def test_a_client_heartbeat_is_answered_with_the_brokers_boot_id():
    memory = MemoryCore()
    memory.from_client(b"c", p.encode_heartbeat())
    assert memory.to_client(b"c") == [p.Heartbeat(memory.core.boot_id)]


def test_a_report_is_kept_and_not_answered():
    memory = MemoryCore()
    memory.from_client(b"g", p.encode_report(p.Report("gateway-1", {"requests": 3})))
    assert memory.to_client(b"g") == []
    assert memory.stats()["gateways"] == {"gateway-1": {"requests": 3}}


# --- retries ------------------------------------------------------------------------------


def test_a_request_is_retried_exactly_max_retries_times_then_fails_as_worker_lost():
    memory = MemoryCore("Broker.max_retries=2")
    for n in range(1, 5):
        memory.register(f"w{n}")
    memory.request(b"c", b"r1")
    tried = []
    for _ in range(3):
        [(worker, rids)] = holders(memory).items()
        assert rids == [b"r1"]
        tried.append(worker)
        memory.from_worker(worker, p.encode_disconnect())
    assert len(set(tried)) == 3 and holders(memory) == {}
    assert errors(memory, b"c") == {b"r1": p.E_WORKER_LOST}
    assert memory.core.totals["retries"] == 2
    assert memory.core.requests == {}


def test_with_no_retries_the_first_loss_fails_the_request():
    memory = MemoryCore("Broker.max_retries=0")
    w1, _ = memory.register("w1"), memory.register("w2")
    memory.request(b"c", b"r1")
    assert requests_to(memory, w1) == [b"r1"]
    memory.from_worker(w1, p.encode_disconnect())
    assert holders(memory) == {}
    assert errors(memory, b"c") == {b"r1": p.E_WORKER_LOST}


def test_a_request_whose_worker_sent_a_chunk_is_not_retried():
    memory = MemoryCore()
    w1, w2 = memory.register("w1"), memory.register("w2")
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(token, [b"part"])))
    memory.from_worker(w1, p.encode_disconnect())
    assert requests_to(memory, w2) == []
    [chunk, error] = memory.to_client(b"c")
    assert chunk == p.Chunk(b"r1", [b"part"], "w1")
    assert (error.rid, error.code, error.message) == (
        b"r1", p.E_WORKER_LOST, "worker 'w1' was lost mid-request")
    assert memory.core.totals["retries"] == 0


def test_a_retried_request_waits_in_the_queue_when_no_worker_has_room():
    memory = MemoryCore(QUIET)
    w1, w2 = memory.register("w1"), memory.register("w2", capacity=1)
    memory.request(b"c", b"busy")  # round robin: w1 first
    memory.request(b"c", b"r1")  # then w2, now full
    assert holders(memory) == {w1: [b"busy"], w2: [b"r1"]}
    memory.from_worker(w1, p.encode_drain())
    memory.from_worker(w2, p.encode_disconnect())
    assert holders(memory) == {} and queued(memory) == [b"r1"]
    memory.register("w3")
    assert holders(memory) == {b"w3": [b"r1"]}


def test_a_direct_request_is_never_retried_elsewhere():
    memory = MemoryCore()
    w1, w2 = memory.register("w1"), memory.register("w2")
    memory.request(b"c", b"r1", policy=p.DIRECT, target="w1")
    assert requests_to(memory, w1) == [b"r1"]
    memory.from_worker(w1, p.encode_disconnect())
    assert requests_to(memory, w2) == []
    [error] = memory.to_client(b"c")
    assert (error.code, error.message) == (
        p.E_WORKER_LOST, "worker 'w1' was lost before its first chunk (disconnected)")


# --- capacity -----------------------------------------------------------------------------


def test_a_worker_is_given_no_more_requests_than_its_capacity():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1", capacity=2)
    for n in range(5):
        memory.request(b"c", b"r%d" % n)
    first = tokens_to(memory, w1)
    assert [p.split_request_token(t)[1] for t in first] == [b"r0", b"r1"]
    assert queued(memory) == [b"r2", b"r3", b"r4"]
    end(memory, w1, first[0])
    assert requests_to(memory, w1) == [b"r2"]  # one freed slot, one more request
    assert memory.core.registry.by_id["w1"].inflight == 2


def test_a_worker_of_capacity_zero_takes_every_request():
    memory = MemoryCore()
    w1 = memory.register("w1", capacity=0)
    for n in range(100):
        memory.request(b"c", b"r%d" % n)
    assert len(requests_to(memory, w1)) == 100
    assert memory.core.queues == {}


# --- a worker's refusals over its capacity (it serves several brokers) --------------------


def refuse(memory: MemoryCore, worker: bytes, token: bytes) -> None:
    memory.from_worker(worker, p.encode_error(p.Error(token, p.E_WORKER_FULL, "full")))


def heartbeat(memory: MemoryCore, worker: bytes, inflight: int | None) -> None:
    memory.from_worker(worker, p.encode_heartbeat(p.Heartbeat(inflight=inflight)))


def test_a_refused_request_goes_to_another_worker_and_the_refusal_is_counted():
    memory = MemoryCore(QUIET)
    w1, w2 = memory.register("w1", capacity=1), memory.register("w2", capacity=1)
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    refuse(memory, w1, token)
    assert holders(memory) == {w2: [b"r1"]}
    assert memory.to_client(b"c") == []  # the client hears nothing of it
    stats = memory.stats()
    assert stats["broker"]["refusals"] == 1 and stats["broker"]["failed"] == 0
    assert [(w["id"], w["refusals"], w["inflight"]) for w in stats["workers"]] == [
        ("w1", 1, 0), ("w2", 0, 1)]


def test_a_worker_that_refused_is_full_until_a_heartbeat_says_it_has_room():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1", capacity=2)
    memory.request(b"c", b"r1")
    refuse(memory, w1, tokens_to(memory, w1)[0])
    assert queued(memory) == [b"r1"]  # nobody else: it waits
    heartbeat(memory, w1, 2)  # still full with other brokers' requests
    assert queued(memory) == [b"r1"]
    heartbeat(memory, w1, 1)
    assert requests_to(memory, w1) == [b"r1"] and queued(memory) == []


def test_a_heartbeat_that_counts_nothing_ends_the_wait_too():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1", capacity=1)
    memory.request(b"c", b"r1")
    refuse(memory, w1, tokens_to(memory, w1)[0])
    heartbeat(memory, w1, None)
    assert requests_to(memory, w1) == [b"r1"]


def test_an_unlimited_worker_that_refused_has_room_again_at_its_next_heartbeat():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1", capacity=0)
    memory.request(b"c", b"r1")
    refuse(memory, w1, tokens_to(memory, w1)[0])
    assert queued(memory) == [b"r1"]
    heartbeat(memory, w1, 50)  # whatever it runs: no count is over "unlimited"
    assert requests_to(memory, w1) == [b"r1"]


def test_a_worker_that_refused_has_room_again_when_a_request_of_this_broker_ends():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1", capacity=2)
    memory.request(b"c", b"r1")
    memory.request(b"c", b"r2")
    first, second = tokens_to(memory, w1)
    refuse(memory, w1, second)
    memory.request(b"c", b"r3")
    assert queued(memory) == [b"r2", b"r3"]
    end(memory, w1, first)
    assert requests_to(memory, w1) == [b"r2", b"r3"]


def test_a_refused_request_waits_as_long_as_a_queued_one_and_fails_as_busy():
    memory = MemoryCore(QUIET, "Broker.queue_timeout=2")
    w1 = memory.register("w1", capacity=1)
    memory.request(b"c", b"r1")
    for _ in range(50):  # a worker that says it has room and refuses, again and again
        refuse(memory, w1, tokens_to(memory, w1)[0])
        assert memory.to_client(b"c") == []
        memory.tick(memory.time + 0.039)
        heartbeat(memory, w1, 0)
    memory.tick(memory.time + 0.06)  # over 2 s since it was first refused
    refuse(memory, w1, tokens_to(memory, w1)[0])
    assert tokens_to(memory, w1) == []
    [error] = memory.to_client(b"c")
    assert (error.rid, error.code) == (b"r1", p.E_QUEUE_FULL)
    assert error.message.startswith("every worker of 'generate' is busy (waited "
                                    "Broker.queue_timeout: 2 s)")
    assert memory.core.requests == {}


def test_a_refused_request_keeps_the_time_it_has_waited_in_the_queue():
    memory = MemoryCore(QUIET, "Broker.queue_timeout=2")
    w1 = memory.register("w1", capacity=1)
    memory.request(b"c", b"r1")
    memory.request(b"c", b"r2")  # waits behind r1
    memory.tick(START + 1.5)
    end(memory, w1, tokens_to(memory, w1)[0])
    refuse(memory, w1, tokens_to(memory, w1)[0])  # r2, after 1.5 s in the queue
    assert queued(memory) == [b"r2"]
    memory.tick(START + 2.1)
    assert errors(memory, b"c") == {b"r2": p.E_QUEUE_FULL}


def test_a_worker_that_refuses_everything_is_sent_one_request_per_heartbeat_of_room():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1", capacity=1)
    for n in range(20):
        memory.request(b"c", b"r%d" % n)
    [token] = tokens_to(memory, w1)
    for _ in range(10):
        refuse(memory, w1, token)
        assert tokens_to(memory, w1) == []  # full: nothing until it says it has room
        heartbeat(memory, w1, 0)
        [token] = tokens_to(memory, w1)
    assert memory.core.totals["refusals"] == 10 and len(queued(memory)) == 19


def test_room_counts_the_requests_of_other_brokers_as_of_the_last_heartbeat():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1", capacity=2)
    heartbeat(memory, w1, 1)  # one from another broker
    memory.request(b"c", b"r1")
    memory.request(b"c", b"r2")
    assert requests_to(memory, w1) == [b"r1"] and queued(memory) == [b"r2"]
    heartbeat(memory, w1, 1)  # the other broker's ended; r1 runs
    assert requests_to(memory, w1) == [b"r2"] and queued(memory) == []


def test_a_refused_request_waits_at_the_head_of_the_queue():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1", capacity=2)
    memory.request(b"c", b"r1")
    memory.request(b"c", b"r2")
    memory.request(b"c", b"r3")
    first, second = tokens_to(memory, w1)
    refuse(memory, w1, second)
    assert queued(memory) == [b"r2", b"r3"]  # r2 came first


def test_a_refusal_after_a_chunk_is_relayed_as_the_error_it_is():
    memory = MemoryCore(QUIET)
    w1, w2 = memory.register("w1", capacity=1), memory.register("w2", capacity=1)
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(token, [b"a"])))
    refuse(memory, w1, token)
    assert holders(memory) == {}
    assert [type(m) for m in memory.to_client(b"c")] == [p.Chunk, p.Error]
    assert memory.core.totals["refusals"] == 0


def test_a_refused_direct_request_waits_for_its_own_worker():
    memory = MemoryCore(QUIET)
    w1, w2 = memory.register("w1", capacity=1), memory.register("w2", capacity=1)
    memory.request(b"c", b"r1", policy=p.DIRECT, target="w1")
    refuse(memory, w1, tokens_to(memory, w1)[0])
    assert holders(memory) == {} and queued(memory) == [b"r1"]
    heartbeat(memory, w1, 0)
    assert holders(memory) == {w1: [b"r1"]}


def test_least_loaded_sees_the_requests_of_other_brokers_as_of_the_last_heartbeat():
    memory = MemoryCore(QUIET)
    w1, w2 = memory.register("w1", capacity=4), memory.register("w2", capacity=4)
    heartbeat(memory, w1, 3)  # three from other brokers
    memory.request(b"c", b"r1", policy="least_loaded")
    memory.request(b"c", b"r2", policy="least_loaded")
    memory.request(b"c", b"r3", policy="least_loaded")
    assert holders(memory) == {w2: [b"r1", b"r2", b"r3"]}
    assert [w["inflight_elsewhere"] for w in memory.stats()["workers"]] == [3, 0]
    heartbeat(memory, w2, 3)  # this broker's three: none from elsewhere
    assert memory.core.registry.by_id["w2"].inflight_elsewhere == 0


# --- the queue ----------------------------------------------------------------------------


def busy_worker(*overrides: str) -> tuple[MemoryCore, bytes]:
    """A core whose one worker (capacity 1) holds a request of client c0."""
    memory = MemoryCore(QUIET, *overrides)
    worker = memory.register("w1", capacity=1)
    memory.request(b"c0", b"busy")
    return memory, worker


def test_queued_requests_leave_in_the_order_they_came():
    memory, w1 = busy_worker()
    for rid in (b"a", b"b", b"c", b"d"):
        memory.request(b"c1", rid)
    [token] = tokens_to(memory, w1)
    order = []
    for _ in range(4):
        end(memory, w1, token)
        [token] = tokens_to(memory, w1)
        order.append(p.split_request_token(token)[1])
    assert order == [b"a", b"b", b"c", b"d"]


def test_a_queued_request_expires_after_exactly_queue_timeout():
    memory, _ = busy_worker("Broker.queue_timeout=5")
    memory.request(b"c1", b"first")  # queued at START
    memory.time = START + 1
    memory.request(b"c1", b"second")
    memory.tick(START + 4.999)
    assert errors(memory, b"c1") == {}
    memory.tick(START + 5)
    [error] = memory.to_client(b"c1")
    assert (error.rid, error.code) == (b"first", p.E_QUEUE_FULL)
    assert error.message == "every worker of 'generate' is busy (waited Broker.queue_timeout: 5 s)"
    assert queued(memory) == [b"second"]
    memory.tick(START + 6)
    assert errors(memory, b"c1") == {b"second": p.E_QUEUE_FULL}
    assert memory.core.queue_wait_total == 10.0


def test_a_queue_expiry_with_no_worker_left_says_so():
    memory = MemoryCore(QUIET, "Broker.queue_timeout=1")
    memory.request(b"c", b"r1")  # no worker yet: it waits for one
    memory.tick(START + 1)
    [error] = memory.to_client(b"c")
    assert (error.code, error.message) == (
        p.E_NO_WORKERS, "no worker serves 'generate' (waited Broker.queue_timeout: 1 s)")


@pytest.mark.parametrize("most", [0, 2])
def test_the_queue_takes_max_queue_requests_and_refuses_the_next(most):
    memory, _ = busy_worker(f"Broker.max_queue={most}")
    for n in range(most + 1):
        memory.request(b"c%d" % n, b"r")
    assert len(queued(memory)) == most
    [error] = memory.to_client(b"c%d" % most)
    assert (error.code, error.message) == (
        p.E_QUEUE_FULL, f"every worker of 'generate' is busy (the queue is full: "
                        f"Broker.max_queue is {most})")


def test_a_client_queues_max_queue_per_client_requests_and_others_still_get_in():
    memory, _ = busy_worker("Broker.max_queue_per_client=2")
    for rid in (b"r1", b"r2", b"r3"):
        memory.request(b"greedy", rid)
    memory.request(b"other", b"r1")
    assert errors(memory, b"greedy") == {b"r3": p.E_QUEUE_FULL}
    assert errors(memory, b"other") == {}
    assert memory.core.queued_by_client == {b"greedy": 2, b"other": 1}


def test_only_requests_that_can_go_pass_a_direct_request_waiting_for_its_busy_worker():
    memory = MemoryCore(QUIET)
    w1, w2 = memory.register("w1", capacity=1), memory.register("w2", capacity=1)
    memory.request(b"c", b"on-w1", policy=p.DIRECT, target="w1")
    memory.request(b"c", b"on-w2", policy=p.DIRECT, target="w2")
    [on_w2] = tokens_to(memory, w2)
    [on_w1] = tokens_to(memory, w1)
    memory.request(b"c", b"head", policy=p.DIRECT, target="w1")
    memory.request(b"c", b"any")
    memory.request(b"c", b"also-w1", policy=p.DIRECT, target="w1")
    assert queued(memory) == [b"head", b"any", b"also-w1"]
    end(memory, w2, on_w2)  # w2 has room: only "any" may take it
    assert holders(memory) == {w2: [b"any"]}
    assert queued(memory) == [b"head", b"also-w1"]
    end(memory, w1, on_w1)
    assert holders(memory) == {w1: [b"head"]}
    assert queued(memory) == [b"also-w1"]


# --- liveness -----------------------------------------------------------------------------


def test_a_worker_silent_for_more_than_interval_times_misses_is_evicted_and_not_before():
    memory = MemoryCore("Broker.heartbeat_interval=1", "Broker.heartbeat_misses=3")
    old = memory.register("old")
    memory.time = START + 0.5
    memory.register("new")
    memory.tick(START + 3.5)  # old: silent 3.5 s; new: exactly 3 s
    assert (state_of(memory, "old"), state_of(memory, "new")) == ("evicted", "ready")
    assert memory.to_worker(old) == []
    assert memory.to_worker(b"new") == [p.Heartbeat(memory.core.boot_id)]


def test_any_message_from_a_worker_counts_as_a_heartbeat():
    memory = MemoryCore("Broker.heartbeat_interval=1", "Broker.heartbeat_misses=3")
    w1 = memory.register("w1")
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    memory.time = START + 3
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(token, [b"a"])))
    memory.tick(START + 5)
    assert state_of(memory, "w1") == "ready"
    memory.from_worker(w1, p.encode_heartbeat())
    memory.tick(START + 8)
    assert state_of(memory, "w1") == "ready"
    memory.tick(START + 9)  # silent for more than 3 s, and checked: once a second
    assert state_of(memory, "w1") == "evicted"
    assert errors(memory, b"c") == {b"r1": p.E_WORKER_LOST}


def test_the_broker_checks_its_workers_once_per_heartbeat_interval():
    memory = MemoryCore("Broker.heartbeat_interval=2", "Broker.heartbeat_misses=1")
    w1 = memory.register("w1")
    memory.tick(START)
    assert len(memory.to_worker(w1)) == 1
    memory.tick(START + 1.9)
    assert memory.to_worker(w1) == []
    memory.tick(START + 2.1)  # a check: silent 2.1 s, more than 2
    assert state_of(memory, "w1") == "evicted"


def test_a_peer_the_broker_does_not_know_is_asked_to_register_once_per_heartbeat_interval():
    memory = MemoryCore("Broker.heartbeat_interval=1")
    memory.from_worker(b"stale", p.encode_heartbeat())
    memory.from_worker(b"stale", p.encode_reply_from_worker(p.End(b"old-request")))
    assert memory.to_worker(b"stale") == [p.Disconnect()]
    memory.time = START + 0.9
    memory.from_worker(b"stale", p.encode_heartbeat())
    assert memory.to_worker(b"stale") == []
    memory.time = START + 1
    memory.from_worker(b"stale", p.encode_heartbeat())
    assert memory.to_worker(b"stale") == [p.Disconnect()]


# --- draining -----------------------------------------------------------------------------


def test_a_draining_worker_finishes_what_it_holds_and_is_given_nothing_new():
    memory = MemoryCore(QUIET)
    w1, w2 = memory.register("w1"), memory.register("w2")
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    memory.from_worker(w1, p.encode_drain())
    assert state_of(memory, "w1") == "draining"
    memory.request(b"c", b"r2")
    memory.request(b"c", b"r3")
    assert holders(memory) == {w2: [b"r2", b"r3"]}
    memory.request(b"c", b"named", policy=p.DIRECT, target="w1")
    assert errors(memory, b"c") == {b"named": p.E_NO_SUCH_WORKER}
    end(memory, w1, token)
    assert memory.to_client(b"c") == [p.End(b"r1", [], "w1")]
    assert state_of(memory, "w1") == "draining"  # not evicted: still there, still heard
    memory.from_worker(w1, p.encode_disconnect())
    assert state_of(memory, "w1") == "evicted"


def test_a_request_waits_while_the_only_worker_drains():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1")
    memory.from_worker(w1, p.encode_drain())
    memory.request(b"c", b"r1")
    assert queued(memory) == [b"r1"] and holders(memory) == {}


# --- deadlines and cancellation -----------------------------------------------------------


def test_a_request_ends_at_request_timeout_not_before():
    memory = MemoryCore(QUIET, "Broker.request_timeout=2.02")
    w1 = memory.register("w1")
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    memory.tick(START + 2.01)
    assert memory.to_client(b"c") == []
    assert memory.to_worker(w1) == [p.Heartbeat(memory.core.boot_id)]
    memory.tick(START + 2.02 + DEADLINE_TICK)
    [error] = memory.to_client(b"c")
    assert (error.code, error.message) == (p.E_TIMEOUT, "request deadline expired")
    assert memory.to_worker(w1) == [p.Cancel(token)]
    assert memory.core.totals["timeouts"] == 1 and memory.core.requests == {}


@pytest.mark.parametrize("timeout_ms", [520, 60_000])
def test_a_request_s_timeout_ms_overrides_the_brokers_timeout(timeout_ms):
    memory = MemoryCore(QUIET)
    memory.register("w1")
    memory.from_client(b"c", p.encode_request_to_broker(
        p.Request(b"r1", "generate", b"{}", timeout_ms=timeout_ms)))
    memory.tick(START + timeout_ms / 1000 - 0.01)
    assert memory.to_client(b"c") == []
    memory.tick(START + timeout_ms / 1000 + DEADLINE_TICK)
    assert errors(memory, b"c") == {b"r1": p.E_TIMEOUT}


def test_a_finished_request_has_no_deadline_left():
    memory = MemoryCore(QUIET, "Broker.request_timeout=1")
    w1 = memory.register("w1")
    memory.request(b"c", b"r1")
    end(memory, w1, tokens_to(memory, w1)[0])
    assert memory.core.deadlines == {}
    memory.tick(START + 2)
    assert memory.to_client(b"c") == [p.End(b"r1", [], "w1")]
    assert memory.core.totals["timeouts"] == 0


def test_a_cancel_reaches_the_worker_and_the_request_ends_quietly():
    memory = MemoryCore()
    w1 = memory.register("w1")
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    memory.from_client(b"c", p.encode_cancel(p.Cancel(b"r1")))
    assert memory.to_worker(w1) == [p.Cancel(token)]
    assert memory.core.requests == {} and memory.core.totals["cancelled"] == 1
    end(memory, w1, token)  # the worker's reply crossed the CANCEL: dropped
    assert memory.to_client(b"c") == []
    assert memory.core.registry.by_id["w1"].inflight == 0


def test_a_cancel_takes_a_request_out_of_the_queue():
    memory, w1 = busy_worker()
    memory.request(b"c1", b"r1")
    memory.from_client(b"c1", p.encode_cancel(p.Cancel(b"r1")))
    assert queued(memory) == [] and memory.core.queued_by_client == {}
    assert [type(m) for m in memory.to_worker(w1)] == [p.Request]  # busy's; no CANCEL
    assert memory.to_client(b"c1") == []


def test_a_cancel_of_a_request_the_broker_does_not_hold_changes_nothing():
    memory = MemoryCore()
    w1 = memory.register("w1")
    memory.request(b"c", b"r1")
    tokens_to(memory, w1)
    memory.from_client(b"other", p.encode_cancel(p.Cancel(b"r1")))  # same rid, other client
    assert memory.to_worker(w1) == [] and len(memory.core.requests) == 1
    assert memory.core.totals["cancelled"] == 0


# --- registration -------------------------------------------------------------------------


def ready(memory: MemoryCore, peer: bytes, token: str = "", capacity: int = 0,
          services: tuple[str, ...] = ("generate",), worker_id: str = "w1") -> list[p.Message]:
    """A READY from `peer`; what the broker answers it (taken)."""
    memory.from_worker(peer, p.encode_ready(p.Ready(worker_id, list(services), capacity, token)))
    return memory.to_worker(peer)


def holder(memory: MemoryCore, worker_id: str = "w1") -> bytes:
    return memory.core.registry.by_id[worker_id].peer


@pytest.mark.parametrize("token", ["", "token-b"])
def test_an_id_in_use_by_a_connected_worker_is_refused(token):
    memory = MemoryCore()
    ready(memory, b"a", token="token-a" if token else "")
    [refusal] = ready(memory, b"b", token=token)
    assert (refusal.rid, refusal.code) == (b"", p.E_ID_IN_USE)
    assert holder(memory) == b"a"


def test_an_id_whose_holder_is_gone_is_taken_and_its_requests_move():
    memory = MemoryCore()
    ready(memory, b"a", token="token-a")
    memory.request(b"c", b"r1")
    assert requests_to(memory, b"a") == [b"r1"]
    memory.gone.workers.add(b"a")
    assert ready(memory, b"b", token="token-b") == [p.Request(
        p.request_token(b"c", b"r1"), "generate", b"{}")]
    assert holder(memory) == b"b" and memory.core.totals["evictions"] == 1


def test_the_same_worker_process_takes_its_id_back_while_its_old_connection_lingers():
    memory = MemoryCore()
    ready(memory, b"a", token="token-a")
    assert ready(memory, b"b", token="token-a") == []
    assert holder(memory) == b"b"
    assert memory.core.totals["id_changes"] == 0


def test_a_repeated_ready_changes_nothing():
    memory = MemoryCore("Broker.heartbeat_interval=1")
    ready(memory, b"a", token="t", capacity=2)
    worker = memory.core.registry.by_id["w1"]
    memory.request(b"c", b"r1")
    memory.to_worker(b"a")
    memory.time = START + 2.5
    assert ready(memory, b"a", token="t", capacity=2) == []
    assert memory.core.registry.by_id["w1"] is worker and worker.inflight == 1
    assert memory.core.totals["evictions"] == 0
    memory.tick(START + 5)  # silent since the READY at 2.5 s only
    assert state_of(memory, "w1") == "ready"


@pytest.mark.parametrize("change", [{"capacity": 3}, {"token": "other"},
                                    {"services": ("generate", "other")}])
def test_a_ready_with_new_settings_registers_the_worker_again(change):
    memory = MemoryCore()
    ready(memory, b"a", token="t", capacity=2)
    memory.request(b"c", b"r1")
    memory.to_worker(b"a")
    settings = {"token": "t", "capacity": 2, **change}
    assert ready(memory, b"a", **settings) == [p.Request(
        p.request_token(b"c", b"r1"), "generate", b"{}")]  # its request, retried
    worker = memory.core.registry.by_id["w1"]
    assert (worker.capacity, worker.token, worker.inflight) == (settings["capacity"],
                                                                 settings["token"], 1)
    assert memory.core.totals["evictions"] == 1


def test_the_broker_takes_max_workers_live_workers():
    memory = MemoryCore("Broker.max_workers=2")
    assert ready(memory, b"a", worker_id="w1") == ready(memory, b"b", worker_id="w2") == []
    [refusal] = ready(memory, b"c", worker_id="w3")
    assert (refusal.code, refusal.message) == (
        p.E_LIMIT, "the broker has its most live workers, 2 (Broker.max_workers)")
    memory.from_worker(b"a", p.encode_disconnect())
    assert ready(memory, b"c", worker_id="w3") == []


def test_a_worker_may_declare_max_services_per_worker_services():
    memory = MemoryCore("Broker.max_services_per_worker=3")
    [refusal] = ready(memory, b"a", services=("s1", "s2", "s3", "s4"))
    assert (refusal.code, refusal.message) == (
        p.E_LIMIT, "READY declares 4 services; the broker takes at most 3 "
                   "(Broker.max_services_per_worker)")
    assert ready(memory, b"a", services=("s1", "s2", "s3")) == []


# --- policies -----------------------------------------------------------------------------


def test_round_robin_goes_through_the_workers_in_the_order_of_their_ids():
    memory = MemoryCore()
    for worker_id in ("w3", "w1", "w2"):
        memory.register(worker_id)
    picked = []
    for n in range(4):
        memory.request(b"c", b"r%d" % n)
        [worker] = holders(memory)
        picked.append(worker)
    assert picked == [b"w1", b"w2", b"w3", b"w1"]


def test_least_loaded_picks_the_lowest_share_of_capacity_and_breaks_ties_in_turn():
    memory = MemoryCore(QUIET)
    memory.register("w1", capacity=2)
    memory.register("w2", capacity=4)
    picked = []
    for n in range(6):
        memory.request(b"c", b"r%d" % n, policy="least_loaded")
        [worker] = holders(memory)
        picked.append(worker)
    # loads (w1, w2) before each: (0, 0) tie, (.5, 0), (.5, .25), (.5, .5) tie, (.5, .75),
    # (w1 full, .75)
    assert picked == [b"w1", b"w2", b"w2", b"w2", b"w1", b"w2"]


class Raises:
    def choose(self, service, candidates):
        raise RuntimeError("no\nluck")


class Stranger:
    def choose(self, service, candidates):
        return WorkerInfo("w9", b"w9", ["generate"], 0)


def with_policies() -> MemoryCore:
    policies = load_policies()
    policies.update(raises=Raises(), stranger=Stranger())
    return MemoryCore(QUIET, policies=policies)


@pytest.mark.parametrize("policy, problem", [
    ("raises", "raised RuntimeError: no luck"),
    ("stranger", "returned a WorkerInfo, not one of the workers it was given")])
def test_a_policy_that_fails_fails_only_its_request(policy, problem):
    memory = with_policies()
    w1 = memory.register("w1")
    memory.request(b"c", b"r1", policy=policy)
    memory.request(b"c", b"r2")
    [error] = memory.to_client(b"c")
    assert (error.rid, error.code, error.message) == (
        b"r1", p.E_POLICY, f"routing policy {policy!r} {problem}")
    assert requests_to(memory, w1) == [b"r2"]
    assert list(memory.core.requests) == [p.request_token(b"c", b"r2")]


def test_a_policy_that_fails_for_a_queued_request_lets_the_next_one_go():
    memory = with_policies()
    w1 = memory.register("w1", capacity=1)
    memory.request(b"c", b"busy")
    memory.request(b"c", b"broken", policy="raises")
    memory.request(b"c", b"next")
    end(memory, w1, tokens_to(memory, w1)[0])
    assert errors(memory, b"c") == {b"broken": p.E_POLICY}
    assert requests_to(memory, w1) == [b"next"] and queued(memory) == []


def test_an_unknown_policy_is_refused_and_direct_needs_a_target():
    memory = MemoryCore()
    memory.register("w1")
    memory.request(b"c", b"r1", policy="fastest")
    memory.request(b"c", b"r2", policy=p.DIRECT)
    assert errors(memory, b"c") == {b"r1": p.E_UNKNOWN_POLICY, b"r2": p.E_BAD_REQUEST}


def test_a_direct_request_for_an_unknown_worker_lists_the_workers_of_its_service():
    memory = MemoryCore()
    for n in range(12):
        memory.register(f"w{n:02}")
    memory.request(b"c", b"r1", policy=p.DIRECT, target="w99")
    [error] = memory.to_client(b"c")
    listed = ", ".join(f"w{n:02}" for n in range(10))
    assert (error.code, error.message) == (
        p.E_NO_SUCH_WORKER, f"no such worker: 'w99' serves no 'generate' requests "
                            f"(workers of 'generate': {listed}, and 2 more)")


# --- peers the sockets cannot reach -------------------------------------------------------


def test_the_requests_of_a_client_whose_connection_closed_end_and_their_workers_stop():
    memory = MemoryCore()
    w1 = memory.register("w1")
    memory.request(b"leaving", b"r1")
    memory.request(b"staying", b"r1")
    leaving, _ = tokens_to(memory, w1)
    memory.gone.clients.add(b"leaving")
    memory.core.clients_disconnected(memory.time)
    assert memory.to_worker(w1) == [p.Cancel(leaving)]
    assert [r.client for r in memory.core.requests.values()] == [b"staying"]
    assert memory.to_client(b"leaving") == [] and memory.core.totals["clients_gone"] == 1


def test_a_client_that_cannot_be_sent_its_replies_loses_those_requests():
    memory = MemoryCore()
    w1 = memory.register("w1")
    memory.request(b"c", b"r1")
    memory.request(b"c", b"r2")
    r1, _ = tokens_to(memory, w1)
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(r1, [b"part"])))
    undelivered = memory.core.to_clients.pop(b"c")
    memory.core.client_unreachable(b"c", undelivered, memory.time)
    assert memory.to_worker(w1) == [p.Cancel(r1)]
    assert list(memory.core.requests) == [p.request_token(b"c", b"r2")]  # not in what failed


def test_a_client_that_leaves_with_no_request_is_no_warning(caplog):
    memory = MemoryCore()
    memory.from_client(b"stats", p.encode_stats_request(p.StatsRequest(b"s1")))
    memory.core.client_unreachable(b"stats", memory.core.to_clients.pop(b"stats"), memory.time)
    memory.request(b"c", b"r1")  # queued: no worker
    memory.core.client_unreachable(b"c", [p.encode_heartbeat()], memory.time)
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= 30] == [
        ("WARNING", "a client is gone or not reading; cancelling its requests")]


def test_a_worker_that_cannot_be_reached_is_evicted_and_its_requests_move():
    memory = MemoryCore()
    w1, w2 = memory.register("w1"), memory.register("w2")
    memory.request(b"c", b"r1")
    assert requests_to(memory, w1) == [b"r1"]
    memory.core.worker_unreachable(w1, memory.time)
    assert state_of(memory, "w1") == "evicted"
    assert requests_to(memory, w2) == [b"r1"]


def test_shutting_down_fails_every_request_and_sends_no_queued_one():
    memory, w1 = busy_worker()
    memory.request(b"c1", b"r1")
    [busy] = tokens_to(memory, w1)
    memory.core.shutdown(memory.time)
    assert errors(memory, b"c0") == {b"busy": p.E_BROKER_UNREACHABLE}
    assert errors(memory, b"c1") == {b"r1": p.E_BROKER_UNREACHABLE}
    assert memory.to_worker(w1) == [p.Cancel(busy)]


# --- bytes a client has not read ----------------------------------------------------------


class Tracker:
    """A zmq.MessageTracker as far as the core is concerned."""

    def __init__(self) -> None:
        self.done = False


def test_a_client_whose_unread_replies_pass_its_budget_loses_its_requests():
    memory = MemoryCore("Broker.max_client_bytes=200000")
    w1 = memory.register("w1")
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    tracker = Tracker()
    assert not memory.core.sent_to_client(b"c", 150_000, tracker, 150_000, memory.time)
    tracker.done = True  # the client read those
    assert not memory.core.sent_to_client(b"c", 60_000, None, 60_000, memory.time)
    # Its body (2 bytes) and replies count: 200,000 bytes are within its budget.
    assert not memory.core.sent_to_client(b"c", 139_998, None, 199_998, memory.time)
    assert memory.core.requests
    assert memory.core.sent_to_client(b"c", 1, None, 199_999, memory.time)
    assert errors(memory, b"c") == {b"r1": p.E_LIMIT}
    assert memory.to_worker(w1) == [p.Cancel(token)]


def test_a_reader_is_not_cut_off_for_what_it_was_sent_in_the_same_pass():
    memory = MemoryCore("Broker.max_buffered_bytes=100000")
    memory.register("w1")
    memory.request(b"c", b"r1")
    burst = READER_SLACK + 1000
    assert not memory.core.sent_to_client(b"c", burst, None, burst, memory.time)
    assert memory.core.sent_to_client(b"c", 1, None, 1, memory.time)  # then it did not read


def test_a_tick_marks_the_last_bytes_sent_to_a_client_and_a_failed_mark_forgets_them():
    memory = MemoryCore()
    memory.core.sent_to_client(b"c", 100, None, 100, memory.time)
    unreleased = memory.core.reply_bytes.of(b"c")
    assert not unreleased.wants_tracker(1)
    memory.tick(START)
    assert memory.to_client(b"c") == [p.Heartbeat(memory.core.boot_id)]
    assert unreleased.wants_tracker(1)
    memory.core.client_unreachable(b"c", [p.encode_heartbeat()], memory.time)
    assert memory.core.reply_bytes.peers == {} and memory.core.reply_bytes.total == 0


def test_what_a_client_holds_past_its_budget_is_named_in_the_error():
    memory = MemoryCore("Broker.max_client_bytes=200000")
    memory.register("w1")
    memory.request(b"c", b"r1")
    assert memory.core.sent_to_client(b"c", 200_000, None, 200_000, memory.time)
    [error] = memory.to_client(b"c")
    assert error.message == ("200000 bytes of replies wait for this client unread, over "
                             "Broker.max_client_bytes (200000)")


def test_once_everyone_s_budget_is_spent_a_client_that_does_not_read_is_told_so():
    memory = MemoryCore("Broker.max_buffered_bytes=100000")
    memory.register("w1")
    memory.request(b"c", b"r1")
    memory.core.sent_to_client(b"c", READER_SLACK, None, READER_SLACK, memory.time)
    assert not memory.core.sent_to_client(b"c", 1, None, READER_SLACK + 1, memory.time)
    assert memory.core.sent_to_client(b"c", 1, None, 1, memory.time)
    [error] = memory.to_client(b"c")
    assert error.message == (
        f"{READER_SLACK + 2} bytes of replies wait for this client unread, over "
        f"{READER_SLACK} while the broker holds more than Broker.max_buffered_bytes (100000)")


def test_a_client_with_no_request_left_is_not_cut_off_for_its_unread_bytes():
    memory = MemoryCore("Broker.max_client_bytes=200000")
    assert not memory.core.sent_to_client(b"c", 300_000, None, 300_000, memory.time)
    assert memory.to_client(b"c") == []


def test_a_client_s_unread_replies_count_against_its_next_requests():
    memory = MemoryCore("Broker.max_client_bytes=200000")
    memory.register("w1")
    memory.core.sent_to_client(b"c", 199_000, None, 199_000, memory.time)
    memory.request(b"c", b"fits", body=b"x" * 1000)
    memory.request(b"c", b"over", body=b"x")
    [error] = memory.to_client(b"c")
    assert (error.rid, error.code, error.message) == (
        b"over", p.E_LIMIT, "this client holds 200000 bytes in the broker (bodies and unread "
                            "replies); 1 more is over Broker.max_client_bytes (200000)")


# --- how fast the queue drains ------------------------------------------------------------


def test_a_queue_that_cannot_drain_in_time_refuses_at_once_and_says_when_to_retry():
    memory, w1 = busy_worker("Broker.queue_timeout=2.5")
    memory.request(b"c1", b"r1")
    memory.time = START + 0.5
    end(memory, w1, tokens_to(memory, w1)[0])  # r1 leaves the queue for the worker
    memory.tick(START + 1)  # one request left the queue in 1 s
    assert memory.core.drain_rates["generate"].rate == 1.0
    for rid in (b"r2", b"r3", b"r4"):
        memory.request(b"c1", rid)
    [error] = memory.to_client(b"c1")
    assert (error.rid, error.code, error.message) == (
        b"r4", p.E_QUEUE_FULL,
        "every worker of 'generate' is busy (the queue would take 3.0 s) (retry after 3 s)")
    assert queued(memory) == [b"r2", b"r3"]


def test_the_drain_rate_is_averaged_over_intervals_and_forgotten_when_the_queue_stalls():
    rate = DrainRate(START)
    assert rate.update(START + DRAIN_RATE_INTERVAL - 0.01, waiting=True)
    rate.taken = 4
    assert rate.update(START + 2, waiting=True) and rate.rate == 2.0
    rate.taken = 4
    assert rate.update(START + 3, waiting=False) and rate.rate == 3.0  # (2 + 4) / 2
    assert rate.wait(6) == 2.0
    assert rate.update(START + 4, waiting=True) and rate.wait(6) == 0.0  # stalled: unknown
    assert not rate.update(START + 5, waiting=False)  # idle: nothing to say


# --- stats --------------------------------------------------------------------------------


def test_stats_show_the_brokers_state():
    memory = MemoryCore(QUIET, "Broker.stats_max_workers=2")
    w1 = memory.register("w1", capacity=1)
    memory.register("w3")
    memory.from_worker(b"w3", p.encode_disconnect())
    memory.register("w2")
    memory.from_worker(b"w2", p.encode_drain())
    memory.request(b"c", b"done", body=b"123")
    memory.time = START + 0.25
    end(memory, w1, tokens_to(memory, w1)[0])
    memory.request(b"c", b"running", body=b"4567")
    memory.request(b"c", b"waiting", body=b"89")
    memory.core.peer_refused("workers", "10.0.0.7", "key", START + 1)
    memory.core.handshake_failed("clients", "it has no CURVE keys", START + 1)
    memory.time = START + 1.5
    stats = memory.stats()
    assert stats["broker"] == {
        **dict.fromkeys(memory.core.totals, 0),
        "requests": 3, "completed": 1, "evictions": 1, "queued": 1, "auth_failures": 1,
        "handshake_failures": 1, "auth_failures_by_role": {"workers": 1, "clients": 0},
        "handshake_failures_by_role": {"workers": 0, "clients": 1},
        "inflight": 1, "queue_depth": 1, "queue_depth_by_service": {"generate": 1},
        "queue_wait_s_total": 0.0, "body_bytes": 6, "reply_bytes": 0, "uptime_s": 1.5,
        "boot_id": memory.core.boot_id.hex(), "workers_ready": 1, "workers_live": 2,
        "workers_departed": 1, "workers_truncated": True}
    assert stats["workers"] == [
        {"id": "w1", "services": ["generate"], "state": "ready", "capacity": 1, "inflight": 1,
         "inflight_elsewhere": 0, "refusals": 0, "completed": 1, "failed": 0,
         "last_seen_s": 1.25, "latency_p50_s": 0.25, "latency_p99_s": 0.25},
        {"id": "w2", "services": ["generate"], "state": "draining", "capacity": 0,
         "inflight": 0, "inflight_elsewhere": 0, "refusals": 0, "completed": 0, "failed": 0,
         "last_seen_s": 1.5,
         "latency_p50_s": None, "latency_p99_s": None}]
    assert stats["gateways"] == {}


def test_stats_list_the_first_workers_by_id_whether_live_or_departed():
    memory = MemoryCore("Broker.stats_max_workers=3")
    for worker_id in ("w4", "w2", "w3"):
        memory.register(worker_id)
    memory.from_worker(b"w2", p.encode_disconnect())
    broker, workers = memory.stats()["broker"], memory.stats()["workers"]
    assert [(w["id"], w["state"]) for w in workers] == [
        ("w2", "evicted"), ("w3", "ready"), ("w4", "ready")]
    assert broker["workers_truncated"] is False
    memory.register("w1")
    assert [w["id"] for w in memory.stats()["workers"]] == ["w1", "w2", "w3"]
    assert memory.stats()["broker"]["workers_truncated"] is True


def test_stats_of_one_service_list_its_live_workers_whatever_the_others():
    memory = MemoryCore("Broker.stats_max_workers=2")
    for worker_id in ("a1", "a2", "a3"):  # the first by id, of every service
        memory.register(worker_id)
    for worker_id in ("w2", "w1", "w3"):
        memory.from_worker(worker_id.encode(), p.encode_ready(p.Ready(worker_id, ["other"], 0)))
    memory.from_worker(b"w3", p.encode_disconnect())
    stats = memory.core.stats(memory.now(), "other")
    assert [(w["id"], w["state"]) for w in stats["workers"]] == [("w1", "ready"), ("w2", "ready")]
    assert (stats["broker"]["workers_truncated"], stats["gateways"]) == (False, {})
    memory.from_worker(b"w0", p.encode_ready(p.Ready("w0", ["other"], 0)))
    assert memory.core.stats(memory.now(), "other")["broker"]["workers_truncated"] is True
    assert memory.core.stats(memory.now(), "nobody's")["workers"] == []


def test_waiting_stats_of_one_service_share_one_build_per_service():
    memory = MemoryCore("Broker.stats_interval=1")
    memory.register("w1")
    asked = {b"s1": "generate", b"s2": "generate", b"s3": "x", b"s4": "y", b"s5": ""}
    for rid, service in [*asked.items()] * 2:  # past its share, the second round waits
        memory.from_client(b"c", p.encode_stats_request(p.StatsRequest(rid, service)))
    memory.to_client(b"c")
    memory.tick(START)
    replies = memory.core.to_clients[b"c"]
    builds = [replies[n][3] for n in range(5)]  # encoded once for each that asks the same
    assert builds[0] is builds[1] and builds[2] is builds[3]  # generate; those none serves
    assert len({id(build) for build in builds}) == 3  # and the whole
    workers = {m.rid: [w["id"] for w in m.stats["workers"]] for m in memory.to_client(b"c")}
    assert workers == {b"s1": ["w1"], b"s2": ["w1"], b"s3": [], b"s4": [], b"s5": ["w1"]}


def test_latency_percentiles_are_taken_from_the_worker_s_recent_requests():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1")
    for n, seconds in enumerate((0.5, 0.125, 0.375, 0.25)):
        memory.request(b"c", b"r%d" % n)
        memory.time += seconds
        end(memory, w1, tokens_to(memory, w1)[0])
    [worker] = memory.stats()["workers"]
    assert (worker["latency_p50_s"], worker["latency_p99_s"]) == (0.375, 0.5)
    assert worker["completed"] == 4


def ask_stats(memory: MemoryCore, client: bytes, times: int = 1) -> list[p.Message]:
    """A client's STATS, `times` over; what the broker answers at once (taken)."""
    for _ in range(times):
        memory.from_client(client, p.encode_stats_request(p.StatsRequest(b"s")))
    return memory.to_client(client)


def test_stats_past_a_client_s_share_wait_for_one_build_per_stats_interval():
    memory = MemoryCore("Broker.stats_interval=1")
    assert len(ask_stats(memory, b"looping", FRESH_STATS)) == FRESH_STATS
    assert ask_stats(memory, b"looping", 2) == []
    memory.request(b"c", b"r1")  # after those STATS arrived: their answer shows it
    memory.tick(START)
    replies = memory.core.to_clients[b"looping"]
    assert len(replies) == 2 and replies[0][3] is replies[1][3]  # built and encoded once
    assert [m.stats["broker"]["requests"] for m in memory.to_client(b"looping")] == [1, 1]
    assert ask_stats(memory, b"looping") == []
    memory.tick(START + 0.99)
    assert memory.to_client(b"looping") == []
    memory.tick(START + 1)
    assert len(memory.to_client(b"looping")) == 1
    memory.time = START + 1
    assert len(ask_stats(memory, b"looping", FRESH_STATS + 1)) == FRESH_STATS  # a new interval


def test_stats_waiting_are_bounded_per_client_and_in_all():
    memory = MemoryCore("Broker.stats_interval=1")
    for n in range(MAX_STATS_WAITING // MAX_STATS_WAITING_PER_CLIENT):
        client = b"c%d" % n
        answers = ask_stats(memory, client, FRESH_STATS + MAX_STATS_WAITING_PER_CLIENT + 1)
        [refusal] = answers[FRESH_STATS:]
        assert (refusal.rid, refusal.code, refusal.message) == (b"s", 
            p.E_LIMIT, f"{MAX_STATS_WAITING_PER_CLIENT} STATS of this client are waiting "
                       "already: ask again later")
    [refusal] = ask_stats(memory, b"last", FRESH_STATS + 1)[FRESH_STATS:]
    assert (refusal.rid, refusal.code, refusal.message) == (b"s", 
        p.E_LIMIT, f"{MAX_STATS_WAITING} STATS are waiting already: ask again later")
    memory.tick(START)
    assert memory.core.stats_waiting == [] and memory.core.stats_waiting_by_client == {}
    assert ask_stats(memory, b"last") == []  # waits again: there is room


# --- gateways' reports --------------------------------------------------------------------


def report(memory: MemoryCore, name: str, counters: dict) -> None:
    memory.from_client(name.encode(), p.encode_report(p.Report(name, counters)))


def test_reports_are_kept_up_to_their_total_bytes_and_the_rest_are_counted():
    memory = MemoryCore()
    largest = {"p": "x" * (p.MAX_REPORT_BYTES - len('{"p":""}'))}  # JSON of MAX_REPORT_BYTES
    for n in range(MAX_REPORTS_BYTES // p.MAX_REPORT_BYTES):
        report(memory, f"g{n}", largest)
    report(memory, "one-more", {})
    assert len(memory.stats()["gateways"]) == MAX_REPORTS_BYTES // p.MAX_REPORT_BYTES
    assert memory.core.totals["reports_refused"] == 1


def test_a_reporter_silent_for_longer_than_heartbeat_misses_is_forgotten():
    memory = MemoryCore("Broker.heartbeat_interval=1", "Broker.heartbeat_misses=3")
    report(memory, "g1", {"n": 1})
    memory.time = START + 3
    assert memory.stats()["gateways"] == {"g1": {"n": 1}}
    memory.time = START + 3.5
    assert memory.stats()["gateways"] == {}


# --- input the broker refuses -------------------------------------------------------------


def test_a_worker_s_ready_on_the_client_socket_is_refused_and_told_where_to_go():
    memory = MemoryCore()
    settings = memory.core.settings
    for _ in range(WRONG_ENDPOINT_ANSWERS + 1):
        memory.from_client(b"w", p.encode_ready(p.Ready("w1", ["generate"])))
    answers = memory.to_client(b"w")
    assert answers == [p.Error(b"", p.E_WRONG_ENDPOINT, (
        f"{settings.frontend} is the broker's client endpoint (Broker.frontend); workers "
        f"connect to Broker.backend ({settings.backend})"))] * WRONG_ENDPOINT_ANSWERS
    assert memory.core.registry.by_id == {}
    assert memory.core.totals["rejected_frames"] == WRONG_ENDPOINT_ANSWERS + 1
    memory.time = START + 1  # a second later: answered again
    memory.from_client(b"w", p.encode_ready(p.Ready("w1", ["generate"])))
    assert len(memory.to_client(b"w")) == 1


def test_a_client_s_request_or_stats_on_the_worker_socket_is_failed_and_told_where_to_go():
    memory = MemoryCore()
    settings = memory.core.settings
    memory.from_worker(b"c", p.encode_request_to_broker(p.Request(b"r1", "generate", b"{}")))
    memory.from_worker(b"c", p.encode_stats_request(p.StatsRequest(b"s1")))
    memory.from_worker(b"c", p.encode_cancel(p.Cancel(b"r1")))  # not told: dropped
    message = (f"{settings.backend} is the broker's worker endpoint (Broker.backend); "
               f"clients connect to Broker.frontend ({settings.frontend})")
    assert memory.to_worker(b"c") == [p.Error(b"r1", p.E_WRONG_ENDPOINT, message),
                                      p.Error(b"s1", p.E_WRONG_ENDPOINT, message)]
    assert memory.core.requests == {} and memory.core.totals["rejected_frames"] == 3


def test_a_malformed_ready_is_refused_as_a_bad_request_at_a_bounded_rate():
    memory = MemoryCore()
    bad = [p.VERSION, p.READY, b"w1", b"not json"]
    for _ in range(WRONG_ENDPOINT_ANSWERS + 1):
        memory.from_worker(b"w", bad)
    answers = memory.to_worker(b"w")
    assert answers == [p.Error(b"", p.E_BAD_REQUEST,
                               "READY refused: READY info is not JSON")] * WRONG_ENDPOINT_ANSWERS
    memory.from_worker(b"w", [p.VERSION, b"\x42"])  # not a READY: dropped unanswered
    assert memory.to_worker(b"w") == []
    assert memory.core.totals["rejected_frames"] == WRONG_ENDPOINT_ANSWERS + 2


@pytest.mark.parametrize("rid, answered", [(b"r" * p.MAX_CLIENT_RID, True),
                                           (b"r" * (p.MAX_CLIENT_RID + 1), False),
                                           (b"", False)])
def test_a_malformed_client_message_is_answered_if_it_names_a_request_id(rid, answered):
    memory = MemoryCore()
    memory.from_client(b"c", [p.VERSION, p.REQUEST, rid, b"too short"])
    expected = [p.Error(rid, p.E_BAD_REQUEST, "REQUEST needs 8 frames, got 4")] if answered else []
    assert memory.to_client(b"c") == expected
    memory.from_client(b"c", [b"ZR1", p.REQUEST, b"r1", b"old version"])
    assert memory.to_client(b"c") == []
    assert memory.core.totals["rejected_frames"] == 2


def test_a_malformed_batch_is_dropped_and_counted():
    memory = MemoryCore()
    memory.core.malformed_batch(b"c", p.ProtocolError("BATCH ends inside a frame"), memory.time)
    assert memory.core.totals["rejected_frames"] == 1
    assert memory.core.take_outgoing() == ({}, {})


@pytest.mark.parametrize("rid, answered", [(b"r1", True), (b"", False),
                                           (b"r" * (p.MAX_CLIENT_RID + 1), False)])
def test_a_client_message_of_too_many_frames_fails_the_request_it_names(rid, answered):
    memory = MemoryCore()
    memory.core.client_oversized(b"c", [p.VERSION, p.REQUEST, rid], memory.time)
    expected = [p.Error(rid, p.E_LIMIT, "the broker takes no a message of more than 1024 "
                                        "frames")] if answered else []
    assert memory.to_client(b"c") == expected
    assert memory.core.totals["oversized_messages"] == 1


def test_a_worker_message_of_too_many_frames_fails_the_request_it_names_only():
    memory = MemoryCore()
    w1 = memory.register("w1")
    memory.request(b"c", b"big")
    memory.request(b"c", b"small")
    big, small = tokens_to(memory, w1)
    memory.core.worker_oversized(w1, [p.VERSION, p.CHUNK, big], memory.time)
    memory.core.worker_oversized(w1, [p.VERSION, p.CHUNK, b"unknown"], memory.time)
    [error] = memory.to_client(b"c")
    assert (error.rid, error.code, error.message) == (
        b"big", p.E_LIMIT, "worker 'w1' replied with a message of more than 1024 frames")
    assert memory.to_worker(w1) == [p.Cancel(big)]
    assert list(memory.core.requests) == [small]
    assert memory.core.totals["oversized_messages"] == 2


def test_a_reply_that_relaying_would_make_too_long_fails_its_request():
    memory = MemoryCore()
    w1 = memory.register("w1")
    memory.request(b"c", b"fits")
    memory.request(b"c", b"long")
    fits, long = tokens_to(memory, w1)
    most = p.MAX_WORKER_REPLY_FRAMES - 3  # chunks, besides version, command and rid
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(fits, [b"."] * most)))
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(long, [b"."] * (most + 1))))
    [chunk, error] = memory.to_client(b"c")
    assert (chunk.rid, len(chunk.chunks)) == (b"fits", most)
    assert (error.rid, error.code, error.message) == (
        b"long", p.E_LIMIT, "worker 'w1' replied with a message of more than 1023 frames")


def test_a_reply_for_a_request_the_worker_does_not_hold_is_dropped():
    memory = MemoryCore()
    w1, w2 = memory.register("w1"), memory.register("w2")
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    memory.from_worker(w2, p.encode_reply_from_worker(p.End(token)))
    memory.from_worker(w2, p.encode_error(p.Error(token, p.E_HANDLER, "boom")))
    assert memory.to_client(b"c") == [] and len(memory.core.requests) == 1
    memory.from_worker(w1, p.encode_error(p.Error(token, p.E_HANDLER, "boom")))
    assert memory.to_client(b"c") == [p.Error(b"r1", p.E_HANDLER, "boom")]
    assert memory.core.requests == {} and memory.to_worker(w1) == []  # no CANCEL: it ended


def test_a_request_id_already_in_flight_is_refused():
    memory = MemoryCore()
    memory.register("w1")
    memory.request(b"c", b"r1")
    memory.request(b"c", b"r1")
    assert errors(memory, b"c") == {b"r1": p.E_BAD_REQUEST}
    assert memory.core.totals["requests"] == 2 and len(memory.core.requests) == 1


def test_a_client_holds_max_requests_per_client_requests():
    memory = MemoryCore("Broker.max_requests_per_client=2")
    memory.register("w1")
    for rid in (b"r1", b"r2", b"r3"):
        memory.request(b"c", rid)
    [error] = memory.to_client(b"c")
    assert (error.rid, error.code, error.message) == (
        b"r3", p.E_LIMIT,
        "this client has 2 requests in flight, its most (Broker.max_requests_per_client)")


@pytest.mark.parametrize("setting, over, problem", [
    ("Broker.max_request_bytes=10", 11, "the request's body is 11 bytes; the broker takes at "
                                        "most 10 (Broker.max_request_bytes)"),
    ("Broker.max_buffered_bytes=10", 1, "the broker holds 10 bytes of request bodies; 1 more "
                                        "is over Broker.max_buffered_bytes (10)")])
def test_a_body_over_a_byte_budget_is_refused_and_one_at_it_is_taken(setting, over, problem):
    memory = MemoryCore(setting)
    memory.request(b"c", b"at", body=b"x" * 10)  # no worker yet: the body stays held
    memory.request(b"d", b"over", body=b"x" * over)
    assert memory.to_client(b"c") == []
    assert memory.to_client(b"d") == [p.Error(b"over", p.E_LIMIT, problem)]


# --- what a failure says -----------------------------------------------------------------


@pytest.mark.parametrize("lose, reason", [
    (lambda memory: memory.core.worker_unreachable(b"w1", memory.time), "cannot be reached"),
    (lambda memory: ready(memory, b"w1-again", token="other", worker_id="w1") and
     memory.gone.workers.add(b"w1") or ready(memory, b"w1-again", token="other",
                                            worker_id="w1"), "replaced by a new registration"),
    (lambda memory: ready(memory, b"w1", capacity=5), "registered again with new settings"),
    (lambda memory: memory.tick(START + 3.5), "no heartbeat for 3.5 s"),
])
def test_a_direct_request_whose_worker_is_lost_says_why(lose, reason):
    memory = MemoryCore()
    ready(memory, b"w1")
    memory.request(b"c", b"r1", policy=p.DIRECT, target="w1")
    lose(memory)
    [error] = [m for m in memory.to_client(b"c") if m.rid == b"r1"]
    assert (error.code, error.message) == (
        p.E_WORKER_LOST, f"worker 'w1' was lost before its first chunk ({reason})")


def test_the_messages_of_refused_requests():
    memory = MemoryCore()
    memory.register("w1")
    memory.request(b"c", b"r1")
    memory.request(b"c", b"r1")
    memory.request(b"c", b"r2", policy=p.DIRECT)
    memory.core.shutdown(memory.time)
    assert [(m.rid, m.message) for m in memory.to_client(b"c")] == [
        (b"r1", "request id is already in flight"),
        (b"r2", "direct routing needs a target worker id"),
        (b"r1", "the broker is shutting down")]


@pytest.mark.parametrize("target_is, code, message", [
    ("busy", p.E_QUEUE_FULL, "every worker of 'generate' is busy (waited "
                             "Broker.queue_timeout: 1 s)"),
    ("draining", p.E_NO_SUCH_WORKER, "worker 'w1' is gone"),
    ("evicted", p.E_NO_SUCH_WORKER, "worker 'w1' is gone")])
def test_a_direct_request_that_waited_too_long_says_whether_its_worker_is_there(
        target_is, code, message):
    memory = MemoryCore(QUIET, "Broker.queue_timeout=1")
    w1 = memory.register("w1", capacity=1)
    memory.register("w2")
    memory.request(b"c0", b"busy", policy=p.DIRECT, target="w1")
    memory.request(b"c", b"r1", policy=p.DIRECT, target="w1")
    if target_is == "draining":
        memory.from_worker(w1, p.encode_drain())
    elif target_is == "evicted":
        memory.from_worker(w1, p.encode_disconnect())
    memory.tick(START + 1)
    assert memory.to_client(b"c") == [p.Error(b"r1", code, message)]


def test_a_refusal_for_a_full_queue_says_when_to_retry_once_the_drain_rate_is_known():
    memory, w1 = busy_worker("Broker.max_queue=2", "Broker.max_queue_per_client=1",
                             "Broker.queue_timeout=5")
    memory.request(b"c1", b"r1")
    end(memory, w1, tokens_to(memory, w1)[0])  # r1 leaves the queue: 1 in 0.5 s
    memory.tick(START + 0.5)
    memory.request(b"c1", b"r2")
    memory.request(b"c1", b"mine")  # c1 has its share waiting; 2 in the queue: 1 s to wait
    memory.request(b"c3", b"r1")  # the queue is full now
    memory.request(b"c2", b"full")  # 3 in the queue: 1.5 s to wait
    assert [(m.rid, m.message) for m in memory.to_client(b"c1") + memory.to_client(b"c2")] == [
        (b"mine", "every worker of 'generate' is busy (this client has its share of the queue "
                  "waiting (Broker.max_queue_per_client)) (retry after 1 s)"),
        (b"full", "every worker of 'generate' is busy (the queue is full: Broker.max_queue "
                  "is 2) (retry after 2 s)")]
    memory.tick(START + 5.5)
    [expired] = memory.to_client(b"c1")
    assert (expired.rid, expired.message) == (
        b"r2", "every worker of 'generate' is busy (waited Broker.queue_timeout: 5 s) "
               "(retry after 1 s)")


def test_a_direct_request_for_a_busy_worker_is_refused_when_the_queue_is_full():
    memory, _ = busy_worker("Broker.max_queue=0")
    memory.request(b"c1", b"r1", policy=p.DIRECT, target="w1")
    assert errors(memory, b"c1") == {b"r1": p.E_QUEUE_FULL}
    assert list(memory.core.requests) == [p.request_token(b"c0", b"busy")]


# --- the queue, further -------------------------------------------------------------------


def test_a_queue_of_direct_requests_for_a_busy_worker_waits_when_another_worker_frees():
    memory = MemoryCore(QUIET)
    w1, w2 = memory.register("w1", capacity=1), memory.register("w2", capacity=1)
    memory.request(b"c", b"on-w1", policy=p.DIRECT, target="w1")
    memory.request(b"c", b"on-w2", policy=p.DIRECT, target="w2")
    tokens_to(memory, w1)
    [on_w2] = tokens_to(memory, w2)
    memory.request(b"c", b"for-w1", policy=p.DIRECT, target="w1")
    end(memory, w2, on_w2)
    assert holders(memory) == {} and queued(memory) == [b"for-w1"]


def test_a_client_may_queue_exactly_max_queue_per_client():
    memory, _ = busy_worker("Broker.max_queue_per_client=1")
    memory.request(b"c1", b"r1")
    memory.request(b"c1", b"r2")
    assert errors(memory, b"c1") == {b"r2": p.E_QUEUE_FULL} and queued(memory) == [b"r1"]


def test_a_request_that_would_leave_the_queue_exactly_at_queue_timeout_is_taken():
    memory, w1 = busy_worker("Broker.queue_timeout=2")
    memory.request(b"c1", b"r1")
    memory.request(b"c1", b"r2")
    end(memory, w1, tokens_to(memory, w1)[0])  # r1 leaves
    end(memory, w1, tokens_to(memory, w1)[0])  # r2 leaves: 2 in 1 s
    memory.tick(START + 1)
    assert memory.core.drain_rates["generate"].rate == 2.0
    for n in range(3, 8):
        memory.request(b"c1", b"r%d" % n)
    assert queued(memory) == [b"r3", b"r4", b"r5", b"r6"]  # the last leaves in 2 s
    assert errors(memory, b"c1") == {b"r7": p.E_QUEUE_FULL}


def test_a_drain_rate_interval_closes_after_exactly_drain_rate_interval():
    rate = DrainRate(START)
    rate.taken = 1
    assert rate.update(START + DRAIN_RATE_INTERVAL, waiting=False)
    assert rate.rate == 1 / DRAIN_RATE_INTERVAL


# --- routing, further ---------------------------------------------------------------------


def test_round_robin_keeps_a_turn_for_each_service():
    memory = MemoryCore()
    for worker_id in ("w1", "w2"):
        memory.from_worker(worker_id.encode(), p.encode_ready(p.Ready(worker_id, ["a", "b"])))
    picked = []
    for service in ("a", "b", "a"):
        memory.from_client(b"c", p.encode_request_to_broker(p.Request(b"r-" + service.encode()
                                                                      + b"%d" % len(picked),
                                                                      service, b"")))
        [worker] = holders(memory)
        picked.append(worker)
    assert picked == [b"w1", b"w1", b"w2"]


def test_a_direct_request_for_an_unknown_worker_lists_up_to_ten_workers():
    memory = MemoryCore()
    for n in range(10):
        memory.register(f"w{n}")
    memory.request(b"c", b"r1", policy=p.DIRECT, target="w99")
    [error] = memory.to_client(b"c")
    assert error.message.endswith(f"(workers of 'generate': "
                                  f"{', '.join(f'w{n}' for n in range(10))})")


def test_a_body_no_longer_counts_once_its_worker_has_sent_a_first_chunk():
    memory = MemoryCore()
    w1, w2 = memory.register("w1"), memory.register("w2")
    memory.request(b"c", b"r1", body=b"12345")
    [token] = tokens_to(memory, w1)
    assert (memory.core.body_bytes, memory.core.body_bytes_by_client) == (5, {b"c": 5})
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(token, [b"a"])))
    assert (memory.core.body_bytes, memory.core.body_bytes_by_client) == (0, {})
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(token, [])))  # nothing: still sent
    memory.from_worker(w1, p.encode_disconnect())
    assert requests_to(memory, w2) == [] and errors(memory, b"c") == {b"r1": p.E_WORKER_LOST}


def test_a_worker_that_sent_only_empty_chunks_has_sent_nothing_and_its_request_is_retried():
    memory = MemoryCore()
    w1, w2 = memory.register("w1"), memory.register("w2")
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(token, [])))
    memory.from_worker(w1, p.encode_disconnect())
    assert requests_to(memory, w2) == [b"r1"]


# --- who holds a worker id, further -------------------------------------------------------


def test_an_id_taken_while_its_worker_was_away_goes_back_to_that_worker_only():
    memory = MemoryCore()
    ready(memory, b"real", token="token-real")
    memory.from_worker(b"real", p.encode_disconnect())
    assert ready(memory, b"impostor", token="token-impostor") == []
    assert memory.core.totals["id_changes"] == 1
    assert ready(memory, b"real-again", token="token-real") == []  # the impostor is connected
    assert holder(memory) == b"real-again" and memory.core.totals["id_changes"] == 2
    [refusal] = ready(memory, b"impostor", token="token-impostor")
    assert refusal.code == p.E_ID_IN_USE
    memory.from_worker(b"real-again", p.encode_disconnect())
    assert ready(memory, b"real-back", token="token-real") == []  # its own id: no change
    assert memory.core.totals["id_changes"] == 2


def test_a_worker_that_registers_again_is_listed_once():
    memory = MemoryCore()
    w1 = memory.register("w1")
    memory.from_worker(w1, p.encode_disconnect())
    memory.register("w1")
    assert [(w["id"], w["state"]) for w in memory.stats()["workers"]] == [("w1", "ready")]
    assert memory.stats()["broker"]["workers_departed"] == 0


def test_an_evicted_worker_s_stats_count_the_requests_it_lost():
    memory = MemoryCore("Broker.max_retries=0")
    w1 = memory.register("w1")
    for rid in (b"r1", b"r2"):
        memory.request(b"c", rid)
    memory.time = START + 1
    memory.from_worker(w1, p.encode_disconnect())
    [worker] = memory.stats()["workers"]
    assert (worker["state"], worker["inflight"], worker["failed"], worker["last_seen_s"]) == (
        "evicted", 0, 2, 0.0)


# --- answers are limited per peer ---------------------------------------------------------


def test_each_peer_has_its_own_share_of_answers():
    memory = MemoryCore()
    bad_ready = [p.VERSION, p.READY, b"w1", b"not json"]
    wrong = p.encode_ready(p.Ready("w1", ["generate"]))
    for peer in (b"a", b"b"):
        for _ in range(WRONG_ENDPOINT_ANSWERS):
            memory.from_worker(peer, bad_ready)
            memory.from_client(peer, wrong)
        memory.from_worker(peer + b"-stale", p.encode_heartbeat())
    for peer in (b"a", b"b"):
        assert len(memory.to_worker(peer)) == len(memory.to_client(peer)) == WRONG_ENDPOINT_ANSWERS
        assert memory.to_worker(peer + b"-stale") == [p.Disconnect()]
    memory.time = START + 1  # a second later: answered again
    memory.from_worker(b"a", bad_ready)
    assert len(memory.to_worker(b"a")) == 1


# --- input the broker refuses, further ----------------------------------------------------


@pytest.mark.parametrize("rid", [b"r", b"r" * p.MAX_CLIENT_RID])
def test_the_shortest_and_the_longest_request_ids_are_answered(rid):
    memory = MemoryCore()
    memory.core.client_oversized(b"c", [p.VERSION, p.REQUEST, rid], memory.time)
    memory.from_client(b"c", [p.VERSION, p.REQUEST, rid])
    assert [(m.rid, m.code) for m in memory.to_client(b"c")] == [(rid, p.E_LIMIT),
                                                                 (rid, p.E_BAD_REQUEST)]


def test_a_message_too_short_to_name_a_request_is_dropped_unanswered():
    memory = MemoryCore()
    memory.core.client_oversized(b"c", [p.VERSION, p.REQUEST], memory.time)
    memory.core.worker_oversized(b"stranger", [p.VERSION, p.CHUNK], memory.time)
    assert memory.core.take_outgoing() == ({}, {})
    assert memory.core.totals["oversized_messages"] == 2


def test_a_queued_request_goes_to_the_worker_freed_by_a_failed_reply():
    memory, w1 = busy_worker()
    memory.request(b"c1", b"r1")  # queued at START
    [busy] = tokens_to(memory, w1)
    memory.time = START + 2
    memory.core.worker_oversized(w1, [p.VERSION, p.CHUNK, busy], memory.time)
    assert requests_to(memory, w1) == [b"r1"]
    assert memory.core.queue_wait_total == 2.0


# --- the totals ---------------------------------------------------------------------------


def test_the_totals_count_every_event():
    memory = MemoryCore(QUIET, "Broker.max_retries=1", "Broker.max_queue=2")
    w1, w2 = memory.register("w1", capacity=1), memory.register("w2", capacity=1)
    for rid in (b"r1", b"r2", b"r3", b"r4"):
        memory.request(b"c", rid)  # r1 on w1, r2 on w2, r3 and r4 queued
    [r1], [r2] = tokens_to(memory, w1), tokens_to(memory, w2)
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(r1, [b"a", b"b"])))
    end(memory, w1, r1)  # completed; r3 to w1
    memory.from_client(b"c", p.encode_cancel(p.Cancel(b"r3")))  # r4 to w1
    memory.from_client(b"c", p.encode_cancel(p.Cancel(b"r4")))
    memory.from_worker(w2, p.encode_error(p.Error(r2, p.E_HANDLER, "boom")))
    for rid in (b"t1", b"t2"):
        memory.from_client(b"c", p.encode_request_to_broker(
            p.Request(rid, "generate", b"", timeout_ms=100)))
    memory.tick(START + 0.2)  # both time out
    memory.request(b"c", b"e1")  # on w1 (turn)
    memory.request(b"c", b"e2")  # on w2
    memory.from_worker(w1, p.encode_disconnect())  # e1 is retried: waits, w2 is busy
    memory.from_worker(w2, p.encode_disconnect())  # e2 is retried: waits
    # Two more workers register under the id w1 in turn (the first takes e1 and e2) and
    # leave: no retry is left.
    for n in range(2):
        memory.from_client(b"c", [p.VERSION, b"\x42"])
        memory.core.client_oversized(b"c", [p.VERSION, p.CANCEL], memory.time)
        memory.from_worker(b"w%d" % n, p.encode_ready(p.Ready("w1", ["generate"], 0, "t%d" % n)))
        memory.from_worker(b"w%d" % n, p.encode_disconnect())
    memory.request(b"d1", b"x")  # no worker: both wait
    memory.request(b"d2", b"x")
    for client in (b"d1", b"d2"):  # two connections close, one after the other
        memory.gone.clients.add(client)
        memory.core.clients_disconnected(memory.time)
    for n in range(MAX_REPORTERS + 2):
        report(memory, f"g{n}", {})
    for role in ("workers", "clients"):  # keys CURVE refused, handshakes that failed
        memory.core.peer_refused(role, "10.0.0.7", "key", memory.time)
        memory.core.handshake_failed(role, "it has no CURVE keys", memory.time)
    w5, w6 = memory.register("w5", capacity=1), memory.register("w6", capacity=1)
    memory.request(b"c", b"f1")  # refused by one worker, then by the other: it waits
    refuse(memory, w5, tokens_to(memory, w5)[0])
    refuse(memory, w6, tokens_to(memory, w6)[0])
    assert memory.core.totals == {
        "requests": 11, "completed": 1, "failed": 9, "cancelled": 2, "chunks": 2, "errors": 5,
        "retries": 2, "refusals": 2, "timeouts": 2, "evictions": 4, "queued": 7,
        "rejected_frames": 2, "oversized_messages": 2, "id_changes": 2, "clients_gone": 2,
        "reports_refused": 2, "auth_failures": 2, "handshake_failures": 2}


# --- unread bytes at their boundaries -----------------------------------------------------


def client_with_a_request(*overrides: str, chunk: bool = False) -> MemoryCore:
    """A core whose client c has r1 on worker w1, with its body still held unless its
    worker has sent a chunk."""
    memory = MemoryCore(*overrides)
    w1 = memory.register("w1")
    memory.request(b"c", b"r1")
    [token] = tokens_to(memory, w1)
    if chunk:
        memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(token, [b""])))
        memory.to_client(b"c")
    return memory


def test_a_client_holding_no_more_than_reader_slack_is_never_cut_off():
    memory = client_with_a_request("Broker.max_client_bytes=1000")
    read = Tracker()
    assert not memory.core.sent_to_client(b"c", 100, read, 100, memory.time)
    read.done = True
    # Measured again, what it holds is READER_SLACK exactly.
    assert not memory.core.sent_to_client(b"c", READER_SLACK, None, READER_SLACK + 100,
                                          memory.time)
    assert memory.core.sent_to_client(b"c", 1, None, READER_SLACK + 101, memory.time)


def test_a_client_is_cut_off_only_past_its_budget():
    memory = client_with_a_request("Broker.max_client_bytes=200000", chunk=True)
    assert not memory.core.sent_to_client(b"c", 200_000, None, 200_000, memory.time)
    assert memory.core.sent_to_client(b"c", 1, None, 1, memory.time)


def test_everyone_s_budget_is_spent_only_past_max_buffered_bytes():
    memory = client_with_a_request("Broker.max_buffered_bytes=200000", chunk=True)
    assert not memory.core.sent_to_client(b"c", 150_000, None, 150_000, memory.time)
    assert not memory.core.sent_to_client(b"c", 50_000, None, 50_000, memory.time)  # at it
    assert memory.core.sent_to_client(b"c", 1, None, 1, memory.time)


def test_once_everyone_s_budget_is_spent_a_client_may_hold_reader_slack_from_earlier_passes():
    memory = client_with_a_request("Broker.max_buffered_bytes=100000", chunk=True)
    assert not memory.core.sent_to_client(b"c", READER_SLACK, None, READER_SLACK, memory.time)
    assert not memory.core.sent_to_client(b"c", 1, None, 1, memory.time)  # SLACK before it
    assert memory.core.sent_to_client(b"c", 1, None, 1, memory.time)


def test_a_client_cut_off_loses_its_queued_requests_too():
    memory, _ = busy_worker("Broker.max_client_bytes=200000")
    memory.request(b"c0", b"queued")
    memory.time = START + 2
    assert memory.core.sent_to_client(b"c0", 200_001, None, 200_001, memory.time)
    assert errors(memory, b"c0") == {b"busy": p.E_LIMIT, b"queued": p.E_LIMIT}
    assert memory.core.queue_wait_total == 2.0


def test_a_client_that_cannot_be_reached_frees_its_worker_for_the_queue():
    memory, w1 = busy_worker()
    memory.request(b"c1", b"r1")
    [busy] = tokens_to(memory, w1)
    memory.from_worker(w1, p.encode_reply_from_worker(p.Chunk(busy, [b"a"])))
    memory.time = START + 1
    memory.core.client_unreachable(b"c0", memory.core.to_clients.pop(b"c0"), memory.time)
    assert requests_to(memory, w1) == [b"r1"]
    assert memory.core.queue_wait_total == 1.0
    assert (memory.core.totals["completed"], memory.core.totals["failed"]) == (0, 1)


def test_a_gone_client_whose_queued_request_was_failed_meanwhile_is_ended_once():
    memory = with_policies()
    w1 = memory.register("w1", capacity=1)
    memory.request(b"c", b"busy")
    memory.request(b"c", b"broken", policy="raises")  # queued: its policy fails once it goes
    memory.gone.clients.add(b"c")
    memory.core.clients_disconnected(memory.time)
    assert memory.core.requests == {} and memory.core.totals["failed"] == 2
    assert [type(m) for m in memory.to_worker(w1)] == [p.Request, p.Cancel]


# --- stats, further -----------------------------------------------------------------------


def test_stats_round_seconds_to_their_stated_digits():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1", capacity=1)
    memory.request(b"c", b"r1")
    memory.request(b"c", b"r2")  # waits a third of a second
    memory.time = START + 1 / 3
    end(memory, w1, tokens_to(memory, w1)[0])
    end(memory, w1, tokens_to(memory, w1)[0])
    memory.time = START + 2 / 3
    stats = memory.stats()
    assert (stats["broker"]["queue_wait_s_total"], stats["broker"]["uptime_s"]) == (0.333333, 0.667)
    [worker] = stats["workers"]
    assert (worker["latency_p50_s"], worker["last_seen_s"]) == (0.333333, 0.333)


def test_latency_percentiles_of_many_requests_and_only_the_latest_are_kept():
    memory = MemoryCore(QUIET)
    w1 = memory.register("w1")
    for n in range(LATENCY_WINDOW + 100):
        memory.request(b"c", b"r%d" % n)
        memory.time += 0.001 * (n % 200 + 1)  # 1 to 200 ms
        end(memory, w1, tokens_to(memory, w1)[0])
    worker = memory.core.registry.by_id["w1"]
    assert len(worker.latencies) == LATENCY_WINDOW
    [stats] = memory.stats()["workers"]
    assert (stats["latency_p50_s"], stats["latency_p99_s"]) == (0.101, 0.199)


def test_the_failures_of_a_worker_are_counted_in_its_stats():
    memory = MemoryCore()
    w1 = memory.register("w1")
    for rid in (b"r1", b"r2"):
        memory.request(b"c", rid)
    for token in tokens_to(memory, w1):
        memory.from_worker(w1, p.encode_error(p.Error(token, p.E_HANDLER, "boom")))
    [worker] = memory.stats()["workers"]
    assert (worker["failed"], worker["completed"], worker["inflight"]) == (2, 0, 0)


def test_the_first_tick_heartbeats_and_builds_waiting_stats_whatever_the_clock_reads():
    memory = MemoryCore(start=0.0)
    w1 = memory.register("w1")
    assert len(ask_stats(memory, b"c", FRESH_STATS + 2)) == FRESH_STATS  # two wait
    memory.tick(0.0)
    assert memory.to_worker(w1) == [p.Heartbeat(memory.core.boot_id)]
    assert [type(m) for m in memory.to_client(b"c")] == [p.StatsReply] * 2


def test_a_new_worker_displaced_no_one_and_one_that_took_its_id_back_neither():
    memory = MemoryCore()
    ready(memory, b"real", token="token-real")
    assert memory.core.registry.by_id["w1"].displaced == ""
    memory.from_worker(b"real", p.encode_disconnect())
    ready(memory, b"impostor", token="token-impostor")
    assert memory.core.registry.by_id["w1"].displaced == "token-real"
    memory.from_worker(b"impostor", p.encode_disconnect())
    ready(memory, b"real-again", token="token-real")
    assert memory.core.registry.by_id["w1"].displaced == ""


# --- random sequences of events -----------------------------------------------------------

WORKER_IDS = ["w1", "w2", "w3"]
CLIENTS = [b"c1", b"c2"]
POLICIES = ["", "least_loaded", "power_of_two", "random", p.DIRECT]


class BrokerRules(RuleBasedStateMachine):
    """Clients, workers and the clock act in any order; what the broker would send is
    taken after each step and checked."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = MemoryCore("Broker.max_retries=1", "Broker.request_timeout=4",
                                 "Broker.heartbeat_misses=5",
                                 "Broker.queue_timeout=2", "Broker.max_queue=4",
                                 "Broker.max_queue_per_client=3")
        self.core = self.memory.core
        self.rids = (b"r%d" % n for n in itertools.count())
        self.sent: list[tuple[bytes, bytes]] = []  # (client, rid) of every request
        self.endings: Counter[tuple[bytes, bytes]] = Counter()  # END and ERROR received
        self.unanswered: set[tuple[bytes, bytes]] = set()  # cancelled, or its client left
        self.given: dict[bytes, list[bytes]] = {}  # worker -> tokens it was ever sent

    def take(self) -> None:
        to_clients, to_workers = self.core.take_outgoing()
        for client, messages in to_clients.items():
            for message in map(p.decode_to_client, messages):
                if type(message) in (p.Chunk, p.End, p.Error) and message.rid != b"":
                    key = (client, message.rid)
                    assert key in self.sent and self.endings[key] == 0, message
                    if type(message) is not p.Chunk:
                        self.endings[key] += 1
        for worker, messages in to_workers.items():
            for message in map(p.decode_to_worker, messages):
                if type(message) is p.Request:
                    self.given.setdefault(worker, []).append(message.rid)

    def held(self, client: bytes | None = None) -> list[tuple[bytes, bytes]]:
        return [(r.client, r.rid) for r in self.core.requests.values()
                if client is None or r.client == client]

    @rule(worker=st.sampled_from(WORKER_IDS), capacity=st.integers(0, 2))
    def register(self, worker: str, capacity: int) -> None:
        self.memory.from_worker(worker.encode(), p.encode_ready(p.Ready(
            worker, ["generate"], capacity, f"token-{worker}")))
        self.take()

    @rule(client=st.sampled_from(CLIENTS), policy=st.sampled_from(POLICIES),
          named=st.sampled_from(WORKER_IDS))
    def request(self, client: bytes, policy: str, named: str) -> None:
        rid = next(self.rids)
        self.sent.append((client, rid))
        self.memory.request(client, rid, policy, named if policy == p.DIRECT else "")
        self.take()

    def on_workers(self) -> list[tuple[bytes, bytes]]:
        """(worker, token) of the requests that workers hold now."""
        return [(w.peer, token) for w in self.core.registry.by_id.values()
                for token in w.requests]

    def replies(self, worker: bytes, token: bytes, kind: type | str) -> None:
        if kind in (p.E_HANDLER, p.E_WORKER_FULL):
            message, kind = p.Error(token, kind, "boom"), p.Error
        else:
            message = kind(token, [b"x"])
        encode = p.encode_error if kind is p.Error else p.encode_reply_from_worker
        self.memory.from_worker(worker, encode(message))
        self.take()

    @precondition(lambda self: self.on_workers())
    @rule(data=st.data(), kind=st.sampled_from([p.Chunk, p.End, p.E_HANDLER, p.E_WORKER_FULL]))
    def reply(self, data: st.DataObject, kind: type) -> None:
        self.replies(*data.draw(st.sampled_from(self.on_workers())), kind)

    @precondition(lambda self: self.given)
    @rule(data=st.data(), kind=st.sampled_from([p.Chunk, p.End, p.E_HANDLER, p.E_WORKER_FULL]))
    def late_reply(self, data: st.DataObject, kind: type) -> None:
        """A reply for any request the worker was ever given: ended, cancelled, moved."""
        worker = data.draw(st.sampled_from(sorted(self.given)))
        self.replies(worker, data.draw(st.sampled_from(self.given[worker])), kind)

    @precondition(lambda self: self.core.requests)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        client, rid = data.draw(st.sampled_from(self.held()))
        self.unanswered.add((client, rid))
        self.memory.from_client(client, p.encode_cancel(p.Cancel(rid)))
        self.take()

    @rule(worker=st.sampled_from(WORKER_IDS),
          message=st.sampled_from([p.Disconnect(), p.Drain(), p.Heartbeat(),
                                   p.Heartbeat(inflight=0), p.Heartbeat(inflight=2)]))
    def worker_says(self, worker: str, message: p.Message) -> None:
        encode = {p.Disconnect: p.encode_disconnect, p.Drain: p.encode_drain,
                  p.Heartbeat: p.encode_heartbeat}[type(message)]
        self.memory.from_worker(worker.encode(), encode(message))
        self.take()

    @rule(worker=st.sampled_from(WORKER_IDS))
    def worker_unreachable(self, worker: str) -> None:
        self.core.worker_unreachable(worker.encode(), self.memory.time)
        self.take()

    @rule(client=st.sampled_from(CLIENTS))
    def client_leaves(self, client: bytes) -> None:
        self.unanswered.update(self.held(client))
        self.memory.gone.clients.add(client)
        self.core.clients_disconnected(self.memory.time)
        self.memory.gone.clients.clear()  # its routing id is free for the next client
        self.take()

    @rule(seconds=st.sampled_from([0.05, 0.5, 1.0, 2.5]))
    def time_passes(self, seconds: float) -> None:
        self.memory.tick(self.memory.time + seconds)
        self.take()

    @invariant()
    def capacity_is_never_exceeded(self) -> None:
        for worker in self.core.registry.by_id.values():
            assert worker.inflight == len(worker.requests)
            assert worker.capacity == 0 or worker.inflight <= worker.capacity

    @invariant()
    def each_request_is_on_a_worker_or_in_a_queue(self) -> None:
        queued_now = {r.token for q in self.core.queues.values() for r in q}
        for token, req in self.core.requests.items():
            on_worker = req.worker is not None and token in req.worker.requests
            assert on_worker != (token in queued_now)
        assert sum(self.core.requests_by_client.values()) == len(self.core.requests)
        assert sum(self.core.queued_by_client.values()) == len(queued_now)
        assert self.core.body_bytes == sum(len(r.body) for r in self.core.requests.values())

    @invariant()
    def an_ended_request_had_one_ending(self) -> None:
        held = set(self.held())
        for key in self.sent:
            if key not in held:
                assert self.endings[key] == (0 if key in self.unanswered else 1), key

    def teardown(self) -> None:
        self.core.shutdown(self.memory.time)
        self.take()
        assert self.core.requests == {}
        self.an_ended_request_had_one_ending()


BrokerRules.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_random_sequences_of_events = BrokerRules.TestCase


def test_a_refused_key_is_logged_with_its_address_once_per_interval(caplog):
    memory = MemoryCore(QUIET, "Broker.curve_secret_key=keys/broker.key_secret")
    for address, when in (("10.0.0.7", 0), ("10.0.0.7", 9.9), ("10.0.0.8", 9.9), ("10.0.0.7", 10)):
        memory.core.peer_refused("workers", address, "KEY", START + when)
    memory.core.handshake_failed("clients", "it has no CURVE keys", START + 10)
    assert [record.getMessage() for record in caplog.records] == [
        "refused a worker at 10.0.0.7: its public key KEY is not in Broker.curve_workers_dir "
        "(keys/workers)",
        "refused a worker at 10.0.0.8: its public key KEY is not in Broker.curve_workers_dir "
        "(keys/workers) (and 1 more like it)",
        "refused a worker at 10.0.0.7: its public key KEY is not in Broker.curve_workers_dir "
        "(keys/workers)",
        "a client failed its CURVE handshake with Broker.frontend: it has no CURVE keys"]
    assert memory.core.auth_failures_by_role == {"workers": 4, "clients": 0}
