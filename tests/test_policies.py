"""Routing policies as plain objects: each picks from the workers it is given."""

import pytest

from broker.policies import POLICIES, LeastLoaded, PowerOfTwo, Random, RoundRobin
from broker.registry import WorkerInfo


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


def test_power_of_two_never_picks_the_busier_of_two():
    policy, pool = PowerOfTwo(), workers((5, 0), (0, 0))
    assert {policy.choose("a", pool).worker_id for _ in range(50)} == {"w1"}
    assert policy.choose("a", pool[:1]).worker_id == "w0"


def test_random_uses_every_worker():
    policy, pool = Random(), workers((0, 0), (0, 0))
    assert {policy.choose("a", pool).worker_id for _ in range(200)} == {"w0", "w1"}


def test_a_custom_policy_is_one_class_and_one_entry(monkeypatch):
    class FewestCompleted:  # the README's example
        def choose(self, service, candidates):
            return min(candidates, key=lambda w: w.completed)

    monkeypatch.setitem(POLICIES, "fewest_completed", FewestCompleted)
    pool = workers((0, 0), (0, 0))
    pool[0].completed = 7
    assert POLICIES["fewest_completed"]().choose("a", pool).worker_id == "w1"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_picks_one_of_its_candidates(name):
    pool = workers((1, 3), (0, 3), (2, 3))
    assert POLICIES[name]().choose("a", pool) in pool
