"""The gateways' reports, in memory: what the broker keeps of them, and how a gateway
reads them back into /stats and /metrics."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from zroute.protocol import MAX_REPORT_BYTES
from broker.reports import MAX_REPORTERS, MAX_REPORTS_BYTES, Reports
from gateway.metrics import (MAX_WORKER_LABELS, OTHER_WORKERS, Exporter, GatewayMetrics,
                             total)

pytestmark = pytest.mark.timeout(10)


# --- the broker's side -------------------------------------------------------------


def test_reports_keep_the_latest_counters_of_each_name_sorted():
    reports = Reports(expiry=3.0)
    assert reports.store("gateway-2", {"n": 1}, 8, now=0.0) is None
    assert reports.store("gateway-1", {"n": 5}, 8, now=0.5) is None
    assert reports.store("gateway-2", {"n": 2}, 8, now=1.0) is None  # a restarted gateway-2 too
    assert reports.current(now=1.0) == {"gateway-1": {"n": 5}, "gateway-2": {"n": 2}}
    assert list(reports.current(now=1.0)) == ["gateway-1", "gateway-2"]


def test_a_reporter_silent_for_longer_than_the_expiry_is_forgotten():
    reports = Reports(expiry=3.0)
    reports.store("gone", {}, 2, now=0.0)
    reports.store("alive", {}, 2, now=2.0)
    assert list(reports.current(now=3.0)) == ["alive", "gone"]
    assert list(reports.current(now=3.5)) == ["alive"]


def test_reporters_are_bounded_and_a_silent_one_makes_room():
    reports = Reports(expiry=3.0)
    for i in range(MAX_REPORTERS):
        assert reports.store(f"g{i}", {}, 2, now=float(i % 2)) is None
    assert "reporters" in reports.store("one-too-many", {}, 2, now=2.0)
    assert reports.store("g1", {"again": True}, 15, now=2.0) is None  # a known name still reports
    assert len(reports.current(now=2.0)) == MAX_REPORTERS
    assert reports.store("newcomer", {}, 2, now=3.5) is None  # those last heard at 0 are forgotten
    assert len(reports.current(now=3.5)) == MAX_REPORTERS // 2 + 1


def test_the_bytes_of_all_reports_are_bounded_and_a_silent_one_makes_room():
    reports = Reports(expiry=3.0)
    assert reports.store("big", {}, MAX_REPORTS_BYTES - 10, now=0.0) is None
    assert "bytes" in reports.store("small", {}, 11, now=1.0)
    assert reports.store("small", {}, 10, now=1.0) is None
    assert reports.store("big", {}, MAX_REPORTS_BYTES - 10, now=1.0) is None  # its own again
    assert "bytes" in reports.store("big", {}, MAX_REPORTS_BYTES - 9, now=1.0)
    assert reports.store("newcomer", {}, MAX_REPORTS_BYTES, now=4.5) is None  # both silent
    assert list(reports.current(now=4.5)) == ["newcomer"]


# --- the gateway's side -------------------------------------------------------------


def sample_metrics() -> GatewayMetrics:
    metrics = GatewayMetrics()
    metrics.observe(200, "round_robin", "worker-1", "/generate", 0.5, 0.01)
    metrics.observe(200, "-", "", "/echo", 0.2, 0.02)
    metrics.observe(503, "random", "", "/generate", 0.001, None)
    metrics.inflight, metrics.disconnects, metrics.incomplete = 2, 1, 1
    return metrics


def test_a_snapshot_survives_the_wire_and_reads_back_the_same():
    metrics = sample_metrics()
    on_the_wire = orjson.loads(orjson.dumps(metrics.snapshot()))
    back = GatewayMetrics.from_snapshot(on_the_wire)
    assert back.snapshot() == metrics.snapshot()
    assert back.summary() == {"requests": 3, "requests_by_status": {"200": 2, "503": 1},
                              "inflight": 2, "disconnects": 1, "incomplete": 1}


def test_a_report_without_paths_counts_its_requests_under_generate():
    snapshot = orjson.loads(orjson.dumps(sample_metrics().snapshot()))
    snapshot["requests"] = [["200", "random", "worker-1", 3]]  # as gateways reported before
    assert GatewayMetrics.from_snapshot(snapshot).requests == {
        ("200", "random", "worker-1", "/generate"): 3}


def test_a_snapshot_is_small():
    metrics = GatewayMetrics()
    for worker in range(100):  # a hundred workers, each served with three statuses
        for status in (200, 502, 504):
            metrics.observe(status, "round_robin", f"worker-{worker}", "/generate", 0.1, 0.01)
    assert len(orjson.dumps(metrics.snapshot())) < 16 << 10


def broken(change) -> dict:
    snapshot = orjson.loads(orjson.dumps(sample_metrics().snapshot()))
    change(snapshot)
    return snapshot


@pytest.mark.parametrize("snapshot", [
    [], "x", {},
    broken(lambda s: s.pop("inflight")),
    broken(lambda s: s.update(inflight=-1)),
    broken(lambda s: s.update(inflight=True)),
    broken(lambda s: s.update(disconnects=1.5)),
    broken(lambda s: s.update(requests={"200": 1})),
    broken(lambda s: s["requests"].append(["200", "random", 7, 1])),
    broken(lambda s: s["requests"].append(["200", "random", "w"])),
    broken(lambda s: s["requests"].append(["200", "random", "w", "/p", "1"])),
    broken(lambda s: s["requests"].append(["200", "random", "w", 7, 1])),
    broken(lambda s: s["duration"]["counts"].append(1)),
    broken(lambda s: s["duration"]["counts"].__setitem__(0, -1)),
    broken(lambda s: s["first_chunk"].update(sum="0")),
    broken(lambda s: s.update(first_chunk=[])),
], ids=["list", "text", "empty", "no-inflight", "negative", "bool", "float", "requests-dict",
        "label-not-text", "entry-short", "count-text", "path-not-text", "counts-long", "count-negative",
        "sum-text", "histogram-list"])
def test_a_snapshot_that_is_not_one_is_a_value_error(snapshot):
    with pytest.raises(ValueError):
        GatewayMetrics.from_snapshot(snapshot)


def test_total_sums_the_gateways_summaries():
    one, two = sample_metrics(), GatewayMetrics()
    two.observe(200, "random", "worker-2", "/generate", 0.1, 0.01)
    assert total([one.summary(), two.summary()]) == {
        "requests": 4, "requests_by_status": {"200": 3, "503": 1}, "inflight": 2,
        "disconnects": 1, "incomplete": 1}
    assert total([]) == {"requests": 0, "requests_by_status": {}, "inflight": 0,
                         "disconnects": 0, "incomplete": 0}


def test_metrics_label_every_gateway_series_with_its_gateway():
    two = GatewayMetrics()
    two.observe(200, "random", "worker-2", "/generate", 0.1, 0.01)
    page = Exporter().render(None, {"gateway-1": sample_metrics(), "gateway-2": two}).decode()
    samples = [sample for family in text_string_to_metric_families(page)
               for sample in family.samples]
    requests = {(s.labels["gateway"], s.labels["status"], s.labels["worker"],
                 s.labels["path"]): s.value
                for s in samples if s.name == "zroute_http_requests_total"}
    assert requests == {("gateway-1", "200", "worker-1", "/generate"): 1,
                        ("gateway-1", "200", "", "/echo"): 1,
                        ("gateway-1", "503", "", "/generate"): 1,
                        ("gateway-2", "200", "worker-2", "/generate"): 1}
    counts = {s.labels["gateway"]: s.value for s in samples
              if s.name == "zroute_http_request_duration_seconds_count"}
    assert counts == {"gateway-1": 3, "gateway-2": 1}
    inflight = {s.labels["gateway"]: s.value for s in samples
                if s.name == "zroute_http_inflight_requests"}
    assert inflight == {"gateway-1": 2, "gateway-2": 0}


def test_worker_labels_are_bounded_and_the_rest_are_counted_as_other():
    metrics = GatewayMetrics()
    for worker in range(3 * MAX_WORKER_LABELS):  # standalone workers restarted, new ids
        metrics.observe(200, "round_robin", f"worker-{worker:06x}", "/generate", 0.1, 0.01)
    workers = {worker for _, _, worker, _ in metrics.requests}
    assert len(workers) == MAX_WORKER_LABELS + 1 and OTHER_WORKERS in workers
    assert metrics.requests[("200", "round_robin", OTHER_WORKERS, "/generate")] == 2 * MAX_WORKER_LABELS
    metrics.observe(200, "round_robin", "worker-000000", "/generate", 0.1, 0.01)  # a known one still counts
    assert metrics.requests[("200", "round_robin", "worker-000000", "/generate")] == 2


def test_a_snapshot_over_the_report_limit_counts_its_requests_without_their_workers():
    metrics = GatewayMetrics()
    for worker in range(MAX_WORKER_LABELS):  # the longest ids the broker takes
        for status in (200, 499, 502, 504):
            metrics.observe(status, "round_robin", f"{worker:03d}".ljust(255, "w"), "/generate",
                            0.1, None)
    labels = [[*labels, count] for labels, count in metrics.requests.items()]
    assert len(orjson.dumps(labels)) > MAX_REPORT_BYTES
    snapshot = metrics.snapshot()
    assert len(orjson.dumps(snapshot)) <= MAX_REPORT_BYTES
    back = GatewayMetrics.from_snapshot(snapshot)
    assert back.requests == {(str(status), "round_robin", OTHER_WORKERS, "/generate"):
                             MAX_WORKER_LABELS
                             for status in (200, 499, 502, 504)}
    assert back.summary() == metrics.summary()
