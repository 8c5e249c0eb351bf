"""zroute's processes on hosts of their own, across real network hops (tests/hosts.py): the
broker on host 1, workers on hosts 2 and 3, the gateway on host 4, and the HTTP load and
`zroute stats` on host 5.

Every test of the seed's requests, of the wire, of partitions and of slow links runs once
per Security mode, which says what each role adds to its command line and whether its
traffic must be unreadable on the wire: plaintext, and CURVE with the keys that `zroute
keys` made. The tests of CURVE's refusals run with CURVE only.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from broker.registry import latency_percentiles
from tests.hosts import Host, Network, stop_all
from tests.support import ZROUTE, Proc, run_zroute, wait_until, workers_by_id

HOSTS = 5
WORKERS = ("worker-2", "worker-3")  # on hosts 2 and 3
REQUEST_TIMEOUT = 10  # Frontend.request_timeout: the longest a request may last
HUNG_AFTER = REQUEST_TIMEOUT + 5  # the load client gives up on a request after this long
STARTUP_S = 30.0  # for processes to start and find each other on a busy machine


@dataclass(frozen=True)
class Security:
    """A security mode: what each role adds to its command line, and whether the mode's
    traffic must be unreadable on the wire. In the arguments, {keys} is the directory of
    the keys, and {worker} a worker's id, its key's name."""

    name: str
    encrypted: bool = False  # no request or reply may be read on the wire
    broker_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()
    client_args: tuple[str, ...] = ()  # the gateway's and `zroute stats`'


BROKER_KEY = "--Broker.curve_public_key={keys}/broker.key"
# A broker beyond loopback without keys must be told that this is meant.
PLAINTEXT = Security("plaintext", broker_args=("--Broker.insecure=true",))
CURVE = Security("curve", encrypted=True,
                 broker_args=("--Broker.curve_secret_key={keys}/broker.key_secret",),
                 worker_args=("--Backend.curve_key={keys}/{worker}.key_secret", BROKER_KEY),
                 client_args=("--Frontend.curve_key={keys}/gateway.key_secret", BROKER_KEY))
SECURITY = [PLAINTEXT, CURVE]


def greeting(text: str) -> list[str]:
    """The lines the greeting handler streams for `text`."""
    return [f"Hello {word}!\n" for word in text.split(",")]


def ready(stats: dict) -> set[str]:
    return {w["id"] for w in stats["workers"] if w["state"] == "ready"}


class Cluster:
    """zroute on the network's hosts, started with the `zroute` command."""

    def __init__(self, network: Network, security: Security, keys: Path,
                 sleep_time: float) -> None:
        self.network = network
        self.broker_host, *self.worker_hosts, self.gateway_host, self.client = network.hosts
        self.security = security
        self.keys = keys
        self.sleep_time = sleep_time
        self.frontend = f"tcp://{self.broker_host.address}:{network.port()}"
        self.backend = f"tcp://{self.broker_host.address}:{network.port()}"
        self.http_port = network.port()
        self.procs: list[Proc] = []
        self.workers: dict[str, Proc] = {}

    def args(self, role_args: tuple[str, ...], worker: str = "") -> list[str]:
        """A role's arguments of the security mode, with the keys' names filled in."""
        return [arg.format(keys=self.keys, worker=worker) for arg in role_args]

    def start(self) -> None:
        self.broker = self.broker_host.zroute(
            "broker", "broker", "--frontend", self.frontend, "--backend", self.backend,
            *self.args(self.security.broker_args))
        self.procs.append(self.broker)
        for host in self.worker_hosts:
            worker_id = f"worker-{host.index}"
            self.workers[worker_id] = self.worker(host, worker_id)
        self.procs += self.workers.values()
        gateway = self.gateway_host.zroute(
            "gateway", "gateway", "--broker", self.frontend, "--host", self.gateway_host.address,
            "--port", str(self.http_port), f"--Frontend.request_timeout={REQUEST_TIMEOUT}",
            *self.args(self.security.client_args))
        self.procs.append(gateway)
        self.wait_stats(lambda stats: ready(stats) == set(WORKERS), "both workers to register",
                        STARTUP_S)
        wait_until(lambda: "gateway listening" in gateway.output(), STARTUP_S,
                   "the gateway to listen")

    def worker(self, host: Host, worker_id: str, key: str | None = None) -> Proc:
        """`zroute worker` on `host`, with the key named `key` (default: its id's)."""
        return host.zroute(worker_id, "worker", "--broker", self.backend, "--id", worker_id,
                           f"--Backend.sleep_time={self.sleep_time}",
                           *self.args(self.security.worker_args, key or worker_id))

    def stats(self) -> dict:
        return self.wait_stats(lambda stats: True, "the broker's stats")

    def wait_stats(self, condition: Callable[[dict], Any], what: str,
                   timeout: float = 20.0) -> dict:
        """Read the broker's stats as `zroute stats --json` on the client's host does, until
        `condition(stats)` holds (the broker may not answer yet); return those stats."""
        def check() -> dict | None:
            result = self.client.run(ZROUTE, "stats", "--json", "--broker", self.frontend,
                                     "--timeout", "2", *self.args(self.security.client_args))
            stats = json.loads(result.stdout) if result.returncode == 0 else None
            return stats if stats is not None and condition(stats) else None
        return wait_until(check, timeout, what)

    def load_args(self, text: str, concurrency: int, query: str) -> list[str]:
        url = f"http://{self.gateway_host.address}:{self.http_port}/generate{query}"
        return ["-m", "tests.http_load", url, "--body", json.dumps({"text": text}),
                "--concurrency", str(concurrency), "--timeout", str(HUNG_AFTER)]

    def post(self, count: int, text: str = "a,b,c", concurrency: int = 1,
             query: str = "") -> list[dict]:
        """Send `count` requests from the client's host; how each went (tests/http_load.py)."""
        result = self.client.run(sys.executable, *self.load_args(text, concurrency, query),
                                 "--requests", str(count), timeout=60)
        assert result.returncode == 0, result.stderr
        return ends(result.stdout)

    def start_load(self, text: str, concurrency: int) -> Proc:
        """Requests from the client's host, `concurrency` at a time, until the process is
        stopped; ends(proc.output()) reads how they went."""
        load = self.client.python("load", *self.load_args(text, concurrency, ""))
        self.procs.append(load)
        return load

    def close(self) -> None:
        """Stop every process; each must exit 0, with no traceback in its log."""
        exit_codes = stop_all(self.procs)
        problems = [f"{proc.name} exited {exit_codes[proc.name]}:\n{proc.output()[-3000:]}"
                    for proc in self.procs
                    if exit_codes[proc.name] != 0 or "Traceback" in proc.output()]
        assert not problems, "\n".join(problems)


def events(output: str) -> list[dict]:
    """What tests/http_load.py printed."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def ends(output: str) -> list[dict]:
    """How each request went, as tests/http_load.py printed it."""
    return [event for event in events(output) if event["event"] == "end"]


def streaming(load: Proc, worker: str) -> int:
    """Requests of the load that have had their first line from `worker`, and not ended."""
    mine = [event for event in events(load.output()) if event["worker"] == worker]
    started = sum(event["event"] == "first_line" for event in mine)
    ended = sum(event["event"] == "end" and event["first"] is not None for event in mine)
    return started - ended


def correct(result: dict, text: str = "a,b,c") -> bool:
    return (result["status"] == 200 and result["complete"] and result["worker"] in WORKERS
            and result["lines"] == greeting(text))


def latencies(results: list[dict]) -> str:
    """p50 / p99 in ms, by worker, of the time to the first line and to the end."""
    def p50_p99(seconds: list[float]) -> str:
        return " / ".join(f"{1000 * value:.0f}" for value in latency_percentiles(seconds).values())

    return "; ".join(f"{worker}: first line {p50_p99([r['first'] for r in mine])}, "
                     f"end {p50_p99([r['total'] for r in mine])}"
                     for worker in WORKERS
                     if (mine := [r for r in results if r["worker"] == worker]))


@pytest.fixture(params=SECURITY, ids=lambda security: security.name)
def security(request) -> Security:
    return request.param


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """The keys of CURVE's mode, as `zroute keys` makes them: the broker's, worker-2's and
    worker-3's, and the gateway's (which `zroute stats` uses too)."""
    directory = tmp_path_factory.mktemp("curve") / "keys"
    for command in (("init",), ("worker", "worker-2"), ("worker", "worker-3"),
                    ("client", "gateway")):
        result = run_zroute("keys", *command, "--dir", str(directory))
        assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture
def start_cluster(network, security, keys):
    """Starts a Cluster (`start_cluster(sleep_time)`); afterwards stops it, checks how its
    processes ended, and puts the network back as it was."""
    clusters = []

    def start(sleep_time: float) -> Cluster:
        cluster = Cluster(network, security, keys, sleep_time)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield start
    try:
        for cluster in clusters:
            cluster.close()
    finally:
        network.reset()


@pytest.mark.timeout(90)
def test_seed_requests_cross_the_hops(start_cluster):
    cluster = start_cluster(sleep_time=0.01)
    round_robin = cluster.post(4)
    assert all(map(correct, round_robin)), round_robin
    assert Counter(r["worker"] for r in round_robin) == {"worker-2": 2, "worker-3": 2}

    randomly = cluster.post(20, concurrency=4, query="?routing=random")
    assert all(map(correct, randomly)), randomly
    assert {r["worker"] for r in randomly} == set(WORKERS)  # all on one: 2 in a million

    direct = {worker: cluster.post(3, query=f"?worker={worker}") for worker in WORKERS}
    for worker, replies in direct.items():
        assert all(correct(r) and r["worker"] == worker for r in replies), replies

    # The header names the worker that served, as the broker counted it.
    every_reply = round_robin + randomly + [r for replies in direct.values() for r in replies]
    served = Counter(r["worker"] for r in every_reply)
    completed = {w: info["completed"] for w, info in workers_by_id(cluster.stats()).items()}
    assert completed == served


@pytest.mark.timeout(60)
def test_a_capture_reads_the_traffic_only_in_plaintext(start_cluster, security):
    cluster = start_cluster(sleep_time=0)
    word = f"marker{os.getpid()}"
    capture = cluster.worker_hosts[0].link.capture()
    [result] = cluster.post(1, text=word, query="?worker=worker-2")
    traffic = capture.stop()
    assert correct(result, word), result
    assert traffic, "the capture saw no frame"
    assert (word.encode() in traffic) is not security.encrypted  # in the request
    assert (f"Hello {word}!".encode() in traffic) is not security.encrypted  # in the reply


@pytest.mark.timeout(90)
def test_a_partition_ends_streams_visibly_and_the_worker_comes_back(start_cluster):
    cluster = start_cluster(sleep_time=0.1)
    text = ",".join(f"w{i}" for i in range(10))  # a stream of about 1 s
    load = cluster.start_load(text, concurrency=20)
    wait_until(lambda: streaming(load, "worker-2") >= 5, 20, "streams from worker-2")

    host = cluster.worker_hosts[0]
    host.link.cut()
    cluster.wait_stats(lambda stats: "worker-2" not in ready(stats), "worker-2's eviction")
    served_before = len(ends(load.output()))
    wait_until(lambda: len(ends(load.output())) >= served_before + 40, 20,
               "the load to go on with worker-3")
    assert load.stop(HUNG_AFTER) == 0, load.output()

    outcomes = Counter()
    for result in ends(load.output()):
        assert result["total"] < REQUEST_TIMEOUT + 1, result  # nothing hangs
        if correct(result, text):
            outcomes["complete"] += 1
        else:  # a stream that had started on worker-2 ends with an error line, unfinished
            assert (result["status"] == 200 and not result["complete"]
                    and result["worker"] == "worker-2"
                    and result["lines"][-1].startswith("error: worker_lost: ")), result
            outcomes["cut"] += 1
    assert outcomes["cut"] >= 1, outcomes

    host.link.restore()
    stats = cluster.wait_stats(lambda stats: "worker-2" in ready(stats),
                               "worker-2 to come back", 30)
    # The requests sent to worker-2 after the cut had no chunk yet: retried on worker-3,
    # they are among the complete ones.
    assert stats["broker"]["retries"] >= 1, stats["broker"]
    assert cluster.workers["worker-2"].alive  # the same process, not a restarted one
    again = cluster.post(2, text, query="?worker=worker-2")
    assert all(correct(r, text) and r["worker"] == "worker-2" for r in again), again
    print(f"partition: {dict(outcomes)}, broker retries {stats['broker']['retries']}, "
          f"evictions {stats['broker']['evictions']}")


@pytest.mark.timeout(90)
def test_a_slow_and_lossy_link_keeps_replies_whole(start_cluster):
    cluster = start_cluster(sleep_time=0.01)
    link = cluster.worker_hosts[0].link
    text = ",".join("abcdefghij")  # ten lines, 10 ms apart
    for phase, shaping in [("no shaping", {}),
                           ("20 ms delay", {"delay": 0.02}),
                           ("20 ms delay, 2% loss", {"delay": 0.02, "loss": 0.02})]:
        if shaping:
            link.shape(**shaping)
        replies = cluster.post(200, text, concurrency=20)
        said = link.unshape()
        wrong = [r for r in replies if not correct(r, text)]
        assert not wrong, f"{phase}: {wrong}"
        print(f"{phase} on worker-2's link: {latencies(replies)}. {said}")
    stats = cluster.stats()
    assert stats["broker"]["evictions"] == 0, stats["broker"]  # no worker seemed lost


REFUSED = "refused this process's CURVE key"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("security", [CURVE], ids=["curve"])
def test_curve_keeps_out_unknown_and_misplaced_keys(start_cluster, tmp_path):
    cluster = start_cluster(sleep_time=0)
    elsewhere = tmp_path / "elsewhere"  # a key pair the broker does not know
    for command in (("init",), ("worker", "stranger")):
        assert run_zroute("keys", *command, "--dir", str(elsewhere)).returncode == 0
    host = cluster.worker_hosts[0]
    stranger = host.zroute("stranger", "worker", "--broker", cluster.backend, "--id", "stranger",
                           f"--Backend.curve_key={elsewhere}/stranger.key_secret",
                           BROKER_KEY.format(keys=cluster.keys))
    posing = cluster.worker(host, "posing", key="gateway")  # a client's key, as a worker's
    for proc in (stranger, posing):
        proc.expect(2)
        proc.wait(20)
        assert REFUSED in proc.output()
    # A worker's key, as a client's.
    as_client = cluster.client.run(ZROUTE, "stats", "--broker", cluster.frontend,
                                   f"--key={cluster.keys}/worker-2.key_secret",
                                   BROKER_KEY.format(keys=cluster.keys))
    assert as_client.returncode == 1 and REFUSED in as_client.stderr, as_client.stderr

    stats = cluster.wait_stats(lambda s: s["broker"]["auth_failures"] == 3, "3 refusals")
    assert stats["broker"]["auth_failures_by_role"] == {"workers": 2, "clients": 1}
    assert set(workers_by_id(stats)) == set(WORKERS)  # none of them ever registered
    assert f"refused a worker at {host.address}: its public key " in cluster.broker.output()
    assert f"refused a client at {cluster.client.address}: " in cluster.broker.output()
    served = cluster.post(4)
    assert all(map(correct, served)), served


@pytest.mark.timeout(60)
@pytest.mark.parametrize("security", [CURVE], ids=["curve"])
def test_a_revoked_key_is_refused_at_its_next_connection(start_cluster, keys):
    cluster = start_cluster(sleep_time=0)
    revoked = keys / "workers" / "worker-3.key"
    kept = revoked.read_bytes()
    revoked.unlink()
    try:
        wait_until(lambda: "accepting 1 worker key(s)" in cluster.broker.output(), 10,
                   "the broker to read its allowlist again")
        # The connection made before stays: CURVE checks a key as a connection opens.
        [before] = cluster.post(1, query="?worker=worker-3")
        assert correct(before) and before["worker"] == "worker-3", before
        cluster.workers["worker-3"].stop()
        again = cluster.worker(cluster.worker_hosts[1], "worker-3")
        again.expect(2)
        again.wait(20)
        assert REFUSED in again.output()
        cluster.wait_stats(lambda stats: ready(stats) == {"worker-2"}, "worker-3 to be gone")
        after = cluster.post(4)
        assert all(correct(r) and r["worker"] == "worker-2" for r in after), after
    finally:
        revoked.write_bytes(kept)


@pytest.mark.timeout(60)
def test_a_broker_on_a_network_address_needs_keys_or_says_it_is_insecure(network):
    host = network.hosts[0]
    endpoints = ("--frontend", f"tcp://{host.address}:{network.port()}",
                 "--backend", f"tcp://{host.address}:{network.port()}")
    refused = host.run(ZROUTE, "broker", *endpoints)
    assert refused.returncode == 2, refused.stderr
    [line] = refused.stderr.splitlines()
    assert "the broker has no CURVE keys: create them with `zroute keys init" in line, line
    insecure = host.zroute("insecure-broker", "broker", *endpoints, "--Broker.insecure=true")
    wait_until(lambda: "broker serving" in insecure.output(), STARTUP_S, "the broker to serve")
    assert ("WARNING INSECURE: Broker.insecure is true and the broker has no CURVE keys: anyone "
            f"who reaches Broker.frontend (tcp://{host.address}:") in insecure.output()
    assert insecure.stop() == 0
