"""The stats of several brokers as one (zroute/brokerstats.py): totals, each broker's block,
each worker once."""

from __future__ import annotations

from zroute.brokerstats import combine


def broker(requests: int, uptime: float, ready: int, boot: str, **extra) -> dict:
    return {"requests": requests, "uptime_s": uptime, "workers_ready": ready, "boot_id": boot,
            "workers_truncated": False, "queue_depth_by_service": extra.get("queued", {})}


def worker(worker_id: str, state: str = "ready", inflight: int = 0, completed: int = 0,
           p50: float | None = None, seen: float = 0.5, elsewhere: int = 0) -> dict:
    return {"id": worker_id, "state": state, "inflight": inflight, "inflight_elsewhere": elsewhere,
            "refusals": 0, "completed": completed, "failed": 0, "last_seen_s": seen,
            "latency_p50_s": p50, "latency_p99_s": p50}


def test_one_broker_s_stats_are_its_own_with_its_block_under_brokers():
    stats = {"broker": broker(5, 10.0, 2, "ab"), "workers": [worker("w1", completed=5)],
             "gateways": {"g1": {"inflight": 0}}}
    combined = combine([("tcp://b1:5555", stats)])
    assert combined["broker"] == stats["broker"]
    assert combined["brokers"] == [{"endpoint": "tcp://b1:5555", "reachable": True,
                                    **stats["broker"]}]
    assert combined["workers"] == [{**worker("w1", completed=5), "brokers": 1}]
    assert combined["gateways"] == stats["gateways"]


def test_counters_add_up_workers_count_once_and_a_broker_that_did_not_answer_says_why():
    first = {"broker": broker(5, 10.0, 2, "ab", queued={"generate": 1}),
             "workers": [worker("w1", inflight=1, completed=4, p50=0.1, seen=0.7),
                         worker("w2", state="evicted", completed=1)],
             "gateways": {"g1": {"inflight": 1}}}
    second = {"broker": broker(7, 3.0, 1, "cd", queued={"generate": 2, "other": 1}),
              "workers": [worker("w1", state="draining", inflight=2, completed=6, p50=0.3,
                                 seen=0.2)],
              "gateways": {"g1": {"inflight": 1}, "g2": {"inflight": 0}}}
    combined = combine([("tcp://b1:5555", first), ("tcp://b2:5555", "no answer"),
                        ("tcp://b3:5555", second)])
    assert combined["broker"] == {
        "requests": 12, "uptime_s": 10.0, "workers_ready": 2, "boot_id": "ab,cd",
        "workers_truncated": False, "queue_depth_by_service": {"generate": 3, "other": 1}}
    assert [(b["endpoint"], b["reachable"], b.get("error")) for b in combined["brokers"]] == [
        ("tcp://b1:5555", True, None), ("tcp://b2:5555", False, "no answer"),
        ("tcp://b3:5555", True, None)]
    w1, w2 = combined["workers"]
    assert (w1["id"], w1["state"], w1["inflight"], w1["completed"], w1["latency_p50_s"],
            w1["last_seen_s"], w1["brokers"]) == ("w1", "ready", 3, 10, 0.3, 0.2, 2)
    assert (w2["id"], w2["state"], w2["brokers"]) == ("w2", "evicted", 0)
    assert combined["gateways"] == {"g1": {"inflight": 1}, "g2": {"inflight": 0}}


def test_a_worker_s_requests_from_every_broker_count_once():
    # w1 runs 2 requests of the first broker, 1 of the second and 1 of a third that did
    # not answer; each broker counts the others' in its inflight_elsewhere.
    first = {"broker": broker(2, 1.0, 1, "ab"), "gateways": {},
             "workers": [worker("w1", inflight=2, elsewhere=2)]}
    second = {"broker": broker(1, 1.0, 1, "cd"), "gateways": {},
              "workers": [worker("w1", inflight=1, elsewhere=3)]}
    [w1] = combine([("tcp://b1:5555", first), ("tcp://b2:5555", second),
                    ("tcp://b3:5555", "no answer")])["workers"]
    assert (w1["inflight"], w1["inflight_elsewhere"]) == (3, 1)  # the third's, as w1 said
