"""The stats of several brokers as one: what /stats, /metrics, /health and `zroute stats`
show of a deployment that runs N brokers.

Each broker routes on its own and counts its own requests; every worker registers with
every broker, and every gateway reports to every broker. So the totals are the sum of the
brokers' counters, each worker appears once with its requests from every broker, and each
gateway's report is taken from one broker (they all hold the same one).
"""

from __future__ import annotations

from typing import Any

# Totals that count workers, who register with every broker: the most any broker sees,
# not their sum. And the one whose value is a time, not a count.
COUNTS_OF_WORKERS = ("workers_ready", "workers_live", "workers_departed")
LONGEST = ("uptime_s",)
# A worker's counters, summed over the brokers: each broker counts only the requests it
# sent the worker (in flight now, refused, completed, failed), so the sum counts each
# request once. Its latency is the highest of theirs. Its `inflight_elsewhere` is
# recomputed (see _elsewhere), since every broker counts the others' requests in it.
WORKER_SUMS = ("inflight", "refusals", "completed", "failed")
WORKER_HIGHEST = ("latency_p50_s", "latency_p99_s")
# A worker's state as the brokers see it, the first of these that one of them sees: ready
# if any broker may send it work (broker/registry.py's states).
STATES = ("ready", "draining", "evicted")


def combine(answers: list[tuple[str, dict | str]]) -> dict:
    """One stats object from each broker's answer: (endpoint, its STATS object, or why it
    did not answer). The caller makes sure at least one answered."""
    answered = [stats for _, stats in answers if isinstance(stats, dict)]
    brokers = [{"endpoint": endpoint, "reachable": True, **stats["broker"]}
               if isinstance(stats, dict) else
               {"endpoint": endpoint, "reachable": False, "error": stats}
               for endpoint, stats in answers]
    gateways: dict[str, Any] = {}
    for stats in answered:
        for name, report in stats["gateways"].items():
            gateways.setdefault(name, report)
    return {
        "broker": _totals([stats["broker"] for stats in answered]),
        "brokers": brokers,
        "workers": _workers([stats["workers"] for stats in answered]),
        "gateways": gateways,
    }


def _totals(blocks: list[dict]) -> dict:
    totals: dict[str, Any] = {}
    for key, first in blocks[0].items():
        values = [block.get(key, first) for block in blocks]
        if isinstance(first, bool):
            totals[key] = any(values)
        elif key in COUNTS_OF_WORKERS or key in LONGEST:
            totals[key] = max(values)
        elif isinstance(first, (int, float)):
            totals[key] = sum(values)
        elif isinstance(first, dict):
            totals[key] = _sum_by_key(values)
        else:  # the boot ids
            totals[key] = ",".join(map(str, values))
    return totals


def _sum_by_key(counts: list[dict]) -> dict:
    summed: dict[str, Any] = {}
    for count in counts:
        for key, value in count.items():
            summed[key] = summed.get(key, 0) + value
    return summed


def _workers(lists: list[list[dict]]) -> list[dict]:
    """Each worker once, by id, with what every broker sees of it."""
    merged: dict[str, dict] = {}
    seen_by: dict[str, int] = {}
    totals: dict[str, int] = {}  # the most requests a broker saw the worker run
    for workers in lists:
        for worker in workers:
            known = merged.get(worker["id"])
            live = worker["state"] != "evicted"
            seen_by[worker["id"]] = seen_by.get(worker["id"], 0) + live
            total = worker.get("inflight", 0) + worker.get("inflight_elsewhere", 0)
            totals[worker["id"]] = max(totals.get(worker["id"], 0), total)
            if known is None:
                merged[worker["id"]] = dict(worker)
                continue
            for key in WORKER_SUMS:
                known[key] = known.get(key, 0) + worker.get(key, 0)
            for key in WORKER_HIGHEST:
                values = [v for v in (known[key], worker[key]) if v is not None]
                known[key] = max(values) if values else None
            known["state"] = min(known["state"], worker["state"], key=_state_rank)
            known["last_seen_s"] = min(known["last_seen_s"], worker["last_seen_s"])
    for worker_id, worker in merged.items():
        worker["brokers"] = seen_by[worker_id]
        worker["inflight_elsewhere"] = _elsewhere(worker, totals[worker_id])
    return [merged[worker_id] for worker_id in sorted(merged)]


def _elsewhere(worker: dict, most_seen: int) -> int:
    """What a worker runs for brokers that these stats leave out (those that did not
    answer), as of its last heartbeat: the most that one broker saw it run (its own
    requests now, the others' as of the heartbeat) less what the brokers here send it."""
    return max(0, most_seen - worker.get("inflight", 0))


def _state_rank(state: str) -> int:
    return STATES.index(state) if state in STATES else len(STATES)
