"""`zroute serve` with two gateway processes on one port: /stats and /metrics must give
the same answer whichever process takes the connection, and never go backwards."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.http_support import SEED_OUTPUT, SEED_TEXT, async_test
from tests.test_serve import Serve

pytestmark = pytest.mark.timeout(60)

GATEWAYS = ["gateway-1", "gateway-2"]


def requests_by_series(page: str) -> dict[tuple, float]:
    """zroute_http_requests_total from a /metrics page: (gateway, status, policy, worker)
    -> count."""
    return {(s.labels["gateway"], s.labels["status"], s.labels["policy"], s.labels["worker"]):
            s.value
            for family in text_string_to_metric_families(page) for s in family.samples
            if s.name == "zroute_http_requests_total"}


class Observer:
    """Reads /stats and /metrics, each on a new connection, and checks that no counter
    ever goes backwards from one reading to the next."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.highest: dict[tuple, float] = {}

    def _forward(self, key: tuple, value: float) -> None:
        assert value >= self.highest.get(key, 0), f"{key} went back to {value}"
        self.highest[key] = value

    async def stats(self) -> dict:
        async with self.session.get(f"{self.url}/stats") as resp:
            assert resp.status == 200
            stats = await resp.json()
        self._forward(("stats", "total"), stats["gateway"]["requests"])
        for name, counts in stats["gateways"].items():
            self._forward(("stats", name), counts["requests"])
        assert stats["gateway"]["requests"] == sum(
            counts["requests"] for counts in stats["gateways"].values())
        return stats

    async def metrics(self) -> dict[tuple, float]:
        async with self.session.get(f"{self.url}/metrics") as resp:
            assert resp.status == 200
            series = requests_by_series(await resp.text())
        for key, value in series.items():
            self._forward(("metrics", *key), value)
        return series

    async def read(self) -> tuple[dict, dict[tuple, float]]:
        return await self.stats(), await self.metrics()


@async_test
async def test_every_gateway_answers_the_same_stats_and_metrics_and_none_goes_back(stack):
    serve = Serve(stack, "--Backend.sleep_time=0", "--Frontend.ServiceArgs.workers=2",
                  "--Broker.heartbeat_interval=0.2")
    serve.wait_ready()
    serve.wait_children("broker", "Backend-1", *GATEWAYS)

    def answered_by(name: str) -> int:
        return serve.proc.output().count(f"[{name}] INFO request=")

    connector = aiohttp.TCPConnector(force_close=True)  # a new connection, maybe a new process
    async with aiohttp.ClientSession(connector=connector) as session:
        observer = Observer(session, serve.url)
        sent = 0
        while sent < 20 or not all(answered_by(name) for name in GATEWAYS):
            assert sent < 400, "one gateway took every connection"
            async with session.post(f"{serve.url}/generate", json={"text": SEED_TEXT}) as resp:
                assert (resp.status, await resp.text()) == (200, SEED_OUTPUT)
            sent += 1
            await observer.read()  # while the counters move

        # Each gateway reports every heartbeat (0.2 s here): soon every answer counts all.
        for _ in range(200):
            first, first_series = await observer.read()
            if first["gateway"]["requests"] == sent:
                break
        else:
            raise AssertionError(f"/stats never counted the {sent} requests")
        for _ in range(30):  # then every connection, whichever process takes it, agrees
            stats, series = await observer.read()
            assert stats["gateway"]["requests"] == sent
            assert stats["gateways"] == first["gateways"]
            assert series == first_series

    by_gateway = {name: counts["requests"] for name, counts in stats["gateways"].items()}
    assert sorted(by_gateway) == GATEWAYS
    assert by_gateway == {name: answered_by(name) for name in GATEWAYS}
    assert series == {(name, "200", "round_robin", "Backend-1"): float(count)
                      for name, count in by_gateway.items()}
    assert stats["gateway"]["requests_by_status"] == {"200": sent}
