"""Routing policies as plain objects: each picks from the workers it is given; and the
broker's rules for the policies a user names (module:Class), in memory."""

import logging
import random
import sys
from collections import Counter

import pytest

from zroute import protocol as p
from zroute.loader import LoadError
from broker.policies import (POLICIES, LeastLoaded, PowerOfTwo, Random, RoundRobin,
                             is_policy_class, load_policies, load_policy)
from broker.registry import WorkerInfo
from tests.broker_memory import MemoryBroker


def workers(*loads: tuple[int, int]) -> list[WorkerInfo]:
    """Workers w0, w1, ... with (inflight, capacity)."""
    made = []
    for i, (inflight, capacity) in enumerate(loads):
        worker = WorkerInfo(f"w{i}", b"peer%d" % i, ["generate"], capacity)
        worker.inflight = inflight
        made.append(worker)
    return made


def test_round_robin_cycles_per_service():
    policy, pool = RoundRobin(), workers((0, 0), (0, 0), (0, 0))
    picks = [policy.choose("a", pool).worker_id for _ in range(6)]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2"]
    assert policy.choose("b", pool).worker_id == "w0"  # each service has its own turn


def test_least_loaded_takes_the_lowest_share_of_capacity_and_breaks_ties_in_turn():
    policy = LeastLoaded()
    pool = workers((3, 4), (1, 4), (2, 2))  # loads 0.75, 0.25, 1.0
    assert policy.choose("a", pool).worker_id == "w1"
    tied = workers((1, 2), (2, 4), (5, 0))  # 0.5, 0.5, and 5 in flight unlimited
    assert [policy.choose("b", tied).worker_id for _ in range(4)] == ["w0", "w1", "w0", "w1"]


@pytest.fixture
def seeded_random():
    """The random module seeded, so that a test of a random policy sees one fixed
    sequence; its state is restored afterwards."""
    state = random.getstate()
    random.seed(1234)
    yield
    random.setstate(state)


def test_power_of_two_never_picks_the_busier_of_two():
    policy, pool = PowerOfTwo(), workers((5, 0), (0, 0))
    assert {policy.choose("a", pool).worker_id for _ in range(50)} == {"w1"}
    assert policy.choose("a", pool[:1]).worker_id == "w0"


def test_power_of_two_compares_two_workers_not_all(seeded_random):
    policy, pool = PowerOfTwo(), workers((2, 0), (1, 0), (0, 0))
    picks = Counter(policy.choose("a", pool).worker_id for _ in range(300))
    # The busiest never wins its pair; the middle one wins the pair without the idlest,
    # a third of the time (least_loaded would never pick it). The bounds are 3.5
    # standard deviations wide: they would hold for almost any seed.
    assert picks.keys() == {"w1", "w2"}
    assert 70 <= picks["w1"] <= 130, picks


def test_random_uses_every_worker_in_no_fixed_order(seeded_random):
    policy, pool = Random(), workers((0, 0), (0, 0), (0, 0))
    picks = [policy.choose("a", pool).worker_id for _ in range(300)]
    # About a third each (3.5 standard deviations either side), ...
    assert all(70 <= n <= 130 for n in Counter(picks).values()) and len(set(picks)) == 3, \
        Counter(picks)
    # ... and in no order that repeats, as round robin's does every 3 picks.
    for period in range(1, 30):
        assert picks[period:] != picks[:-period], f"the picks repeat every {period}"


def test_least_loaded_picks_the_exact_minimum():
    pool = workers((49, 100), (1, 2), (0, 0), (1, 0))  # .49, .5; unlimited: 0, 1
    assert LeastLoaded().choose("a", pool) is pool[2]
    assert LeastLoaded().choose("a", pool[:2]) is pool[0]
    assert LeastLoaded().choose("a", [pool[1], pool[3]]) is pool[1]  # .5 < 1


def test_power_of_two_takes_the_less_loaded_of_two_random_workers_the_first_on_a_tie():
    pool = workers((3, 0), (1, 0), (2, 0), (1, 0))
    for seed in range(20):
        random.seed(seed)
        first, second = random.sample(pool, 2)
        expected = first if first.load <= second.load else second
        random.seed(seed)
        assert PowerOfTwo().choose("a", pool) is expected


def test_random_picks_at_random_not_in_turn():
    policy, pool = Random(), workers((0, 0), (0, 0))
    random.seed(1)
    picks = [policy.choose("a", pool) for _ in range(100)]
    assert any(a is b for a, b in zip(picks, picks[1:]))  # in turn, never twice in a row


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_picks_one_of_its_candidates(name):
    pool = workers((1, 3), (0, 3), (2, 3))
    assert POLICIES[name]().choose("a", pool) in pool


# --- policies a user names ------------------------------------------------------------


class FewestCompleted:  # the README's example
    """Send work to the worker that has done the least so far."""

    def choose(self, service, candidates):
        return min(candidates, key=lambda w: w.completed)


class Broken:
    def choose(self, service, candidates):
        raise ZeroDivisionError("division by zero")


class Stranger:
    def choose(self, service, candidates):
        return WorkerInfo("w9", b"w9", ["generate"], 0)  # a worker it was not given


class FailsToStart:
    def __init__(self):
        raise RuntimeError("no config\n  here")

    def choose(self, service, candidates):
        return candidates[0]


class NeedsArguments:
    def __init__(self, weight):
        self.weight = weight

    def choose(self, service, candidates):
        return candidates[0]


NOT_A_CLASS = FewestCompleted()
FEWEST = f"{__name__}:FewestCompleted"


@pytest.fixture
def memory():
    brokers = []

    def make(*specs: str) -> MemoryBroker:
        broker = MemoryBroker(load_policies(dict.fromkeys(specs, "Broker.policies")))
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()


def test_a_custom_policy_named_by_module_and_class_routes_requests(memory):
    broker = memory(FEWEST)
    w1, w2 = broker.register("w1"), broker.register("w2")
    broker.core.registry.by_id["w1"].completed = 5
    broker.request(b"c", b"r1", policy=FEWEST)
    assert broker.to_client(b"c") == []
    assert [type(m) for m in broker.to_worker(w2)] == [p.Request]
    assert broker.to_worker(w1) == []


def test_unknown_policy_lists_the_loaded_ones_and_never_imports(memory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "side_effect.py").write_text("open('imported', 'w').close()\nclass P:\n"
                                             "    def choose(self, s, c):\n        return c[0]\n")
    broker = memory(FEWEST)
    broker.register("w1")
    broker.request(b"c", b"r1", policy="side_effect:P")
    [error] = broker.to_client(b"c")
    assert (error.code, error.message) == (p.E_UNKNOWN_POLICY, (
        "unknown routing policy 'side_effect:P' (valid: round_robin, random, least_loaded, "
        f"power_of_two, {FEWEST}, direct)"))
    assert not (tmp_path / "imported").exists() and "side_effect" not in sys.modules


@pytest.mark.parametrize("policy, problem", [
    (f"{__name__}:Broken", "raised ZeroDivisionError: division by zero"),
    (f"{__name__}:Stranger", "returned a WorkerInfo, not one of the workers it was given"),
])
def test_a_policy_that_fails_fails_its_request_only(memory, caplog, policy, problem):
    broker = memory(policy)
    w1 = broker.register("w1")
    with caplog.at_level(logging.WARNING, "zroute.broker"):
        for rid in (b"r1", b"r2"):
            broker.request(b"c", rid, policy=policy)
    message = f"routing policy {policy!r} {problem}"
    assert broker.to_client(b"c") == [p.Error(b"r1", p.E_POLICY, message),
                                      p.Error(b"r2", p.E_POLICY, message)]
    assert [r.message for r in caplog.records] == [message]  # rate-limited
    broker.request(b"c", b"r3")  # the broker goes on
    assert [m.rid[-2:] for m in broker.to_worker(w1)] == [b"r3"]
    assert broker.core.requests.keys() == {b"\x01cr3"}


def test_a_queued_request_whose_policy_fails_leaves_the_queue(memory):
    broker = memory(f"{__name__}:Broken")
    w1 = broker.register("w1", capacity=1)
    broker.request(b"c", b"busy")
    broker.request(b"c", b"broken", policy=f"{__name__}:Broken")  # queued: no room
    broker.request(b"c", b"next")  # queued behind it
    [busy] = broker.to_worker(w1)
    broker.from_worker(w1, p.encode_reply_from_worker(p.End(busy.rid)))
    replies = broker.to_client(b"c")
    assert [(type(m), m.rid) for m in replies] == [(p.End, b"busy"), (p.Error, b"broken")]
    assert replies[1].code == p.E_POLICY
    assert [m.rid[-4:] for m in broker.to_worker(w1)] == [b"next"]
    assert broker.core.queues == {}


@pytest.mark.parametrize("attribute, problem", [
    ("NOT_A_CLASS", "is a FewestCompleted object, not a class: name the policy class itself"),
    ("WorkerInfo", "has no method choose(service, candidates)"),
    ("NeedsArguments", "cannot be created without arguments: TypeError: "),
    ("Missing", f"cannot be loaded: '{__name__}' has no attribute 'Missing'"),
])
def test_a_policy_class_is_checked_when_it_loads(attribute, problem):
    spec = f"{__name__}:{attribute}"
    with pytest.raises(LoadError) as info:
        load_policy(spec, "Broker.policies")
    assert str(info.value).startswith(f"Broker.policies {spec!r} {problem}")


def test_a_policy_that_fails_to_start_is_named_with_its_error_on_one_line():
    spec = f"{__name__}:FailsToStart"
    with pytest.raises(LoadError) as info:
        load_policies({spec: "Frontend.routing_mode"})
    assert str(info.value) == (f"Frontend.routing_mode {spec!r} cannot be created without "
                               "arguments: RuntimeError: no config here")


def test_a_policy_class_is_named_as_module_colon_class():
    assert is_policy_class("mymodule:Fastest") and is_policy_class("path/to/file.py:Fastest")
    assert not is_policy_class("least_loaded")
