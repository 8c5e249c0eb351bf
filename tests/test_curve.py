"""CURVE on one machine: `zroute keys`, a broker that takes only the keys of its allowlists
(one per socket), allowlists that change while it runs, the refusal to listen beyond
loopback without keys, and secret keys that no output shows. tests/test_multihost.py runs
the same across network hops."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
from zmq.auth import load_certificate

from tests.http_support import http, start_gateway, wait_healthy
from tests.support import REPO_ROOT, Stack, free_port, run_zroute, wait_until, workers_by_id
from zroute import protocol as p
from zroute.client import BlockingClient, BrokerError
from zroute.curve import PeerKeys


def make_keys(directory: Path, *commands: tuple[str, ...]) -> None:
    for command in commands:
        result = run_zroute("keys", *command, "--dir", str(directory))
        assert result.returncode == 0, result.stderr


@pytest.fixture
def keys(tmp_path) -> Path:
    """A broker's keys, a worker's (w1) and a gateway's."""
    directory = tmp_path / "keys"
    make_keys(directory, ("init",), ("worker", "w1"), ("client", "gateway"))
    return directory


def broker_args(keys: Path) -> tuple[str, ...]:
    return (f"--Broker.curve_secret_key={keys}/broker.key_secret",)


def peer_args(keys: Path, name: str, setting: str = "Backend.curve_key") -> tuple[str, ...]:
    return (f"--{setting}={keys}/{name}.key_secret", f"--Broker.curve_public_key={keys}/broker.key")


def peer_keys(keys: Path, name: str) -> PeerKeys:
    return PeerKeys.load(str(keys / f"{name}.key_secret"), str(keys / "broker.key"))


@pytest.fixture
def secure_stack(stack: Stack, keys: Path) -> Stack:
    """A broker with CURVE, serving already, and stats() as the gateway's key asks them."""
    return start_secure_broker(stack, keys)


def start_secure_broker(stack: Stack, keys: Path) -> Stack:
    """Start the broker of `stack` with CURVE and the keys of `keys`; once it serves,
    stats() asks as the gateway's key."""
    broker = stack.broker(*broker_args(keys))
    wait_until(lambda: "broker serving" in broker.output(), 10, "the broker to serve")
    stack.client_keys = peer_keys(keys, "gateway")
    return stack


def refused_worker(stack: Stack, name: str, *args: str) -> str:
    """Start a worker that the broker refuses; wait for its exit (2); its output."""
    proc = stack.worker(name, *args)
    proc.expect(2)
    proc.wait(15)
    return proc.output()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.timeout(60)
def test_keys_makes_private_key_pairs_in_the_brokers_layout(tmp_path):
    directory = tmp_path / "keys"
    make_keys(directory, ("init",), ("worker", "w1"), ("client", "gateway"))
    assert {mode(directory), mode(directory / "workers"), mode(directory / "clients")} == {0o700}
    for secret in ("broker", "w1", "gateway"):
        assert mode(directory / f"{secret}.key_secret") == 0o600
        public, secret_key = load_certificate(directory / f"{secret}.key_secret")
        assert secret_key and public
    for public_file, pair in (("broker.key", "broker"), ("workers/w1.key", "w1"),
                              ("clients/gateway.key", "gateway")):
        assert (load_certificate(directory / public_file) ==
                (load_certificate(directory / f"{pair}.key_secret")[0], None))

    before = (directory / "w1.key_secret").read_bytes()
    again = run_zroute("keys", "worker", "w1", "--dir", str(directory))
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr == (f"zroute keys worker: error: {directory}/w1.key_secret exists: keep "
                            "it, or give --force to replace the key pair (the old key then "
                            "stops working)\n")
    assert (directory / "w1.key_secret").read_bytes() == before
    forced = run_zroute("keys", "worker", "w1", "--dir", str(directory), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (directory / "w1.key_secret").read_bytes() != before
    assert mode(directory / "w1.key_secret") == 0o600

    for args, message in (
            (("client", "broker"), "'broker' is not a name for a key"),
            (("client", "a/b"), "'a/b' is not a name for a key"),
            (("worker", "w2", "--dir", str(tmp_path / "none")),
             f"{tmp_path}/none/workers is not a directory: run `zroute keys init --dir "
             f"{tmp_path}/none` first")):
        result = run_zroute("keys", *args, *(() if "--dir" in args else ("--dir", str(directory))))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "--force" in run_zroute("keys", "init", "--help").stdout


@pytest.mark.timeout(60)
def test_each_socket_takes_the_keys_of_its_allowlist_only(secure_stack, keys, tmp_path):
    stack = secure_stack
    elsewhere = tmp_path / "elsewhere"  # a key pair the broker does not know
    make_keys(elsewhere, ("init",), ("worker", "stranger"))
    stranger = (elsewhere / "workers" / "stranger.key").read_text()

    stack.worker("w1", *peer_args(keys, "w1"))
    stack.wait_workers("w1")
    with BlockingClient(stack.frontend, curve=peer_keys(keys, "gateway")) as client:
        assert client.request("generate", "a,b").read() == b"Hello a!\nHello b!\n"

    refused = "refused this process's CURVE key: add its public key to the broker's allowlist"
    assert refused in refused_worker(stack, "stranger",
                                     f"--Backend.curve_key={elsewhere}/stranger.key_secret",
                                     f"--Broker.curve_public_key={keys}/broker.key")
    # A client's key opens the client socket only, and a worker's the worker socket only.
    assert refused in refused_worker(stack, "posing", *peer_args(keys, "gateway"))
    with BlockingClient(stack.frontend, curve=peer_keys(keys, "w1")) as client:
        with pytest.raises(BrokerError) as error:
            client.stats(timeout=5)
    assert error.value.code == p.E_AUTH_FAILED and refused in error.value.message
    # Handshakes that fail before a key can be judged: without keys, or with a key for the
    # broker that is not the broker's.
    plaintext = refused_worker(stack, "plaintext")
    assert "the broker asks for CURVE keys and this process has none" in plaintext
    mine = peer_keys(keys, "gateway")
    wrong_broker = PeerKeys(mine.public, mine.secret, peer_keys(elsewhere, "stranger").broker)
    with BlockingClient(stack.frontend, curve=wrong_broker) as client:
        with pytest.raises(BrokerError) as error:
            client.stats(timeout=5)
    assert error.value.code == p.E_AUTH_FAILED
    assert "is Broker.curve_public_key the broker's public key?" in error.value.message

    # The broker counts a handshake that it failed (a wrong key for it, always), not one
    # that the peer gave up first (without keys, as it may); the two counts come from
    # different events, so either may be read first.
    stats = stack.wait_stats(
        lambda s: (s["broker"]["auth_failures"] == 3
                   and s["broker"]["handshake_failures_by_role"]["clients"] >= 1),
        10, "3 refusals and a failed handshake")
    assert stats["broker"]["auth_failures_by_role"] == {"workers": 2, "clients": 1}
    assert set(workers_by_id(stats)) == {"w1"}  # none of them ever registered
    stranger_key = stranger.split('public-key = "')[1].split('"')[0]
    broker_log = stack.procs[0].output()
    assert (f"refused a worker at 127.0.0.1: its public key {stranger_key} is not in "
            f"Broker.curve_workers_dir ({keys}/workers)") in broker_log
    assert ("a client failed its CURVE handshake with Broker.frontend: the public key it has "
            "for the broker is not the broker's") in broker_log


@pytest.mark.timeout(60)
def test_an_allowlist_change_holds_without_a_restart(secure_stack, keys):
    stack = secure_stack
    broker = stack.procs[0]
    make_keys(keys, ("worker", "late"))  # after the broker started
    wait_until(lambda: "accepting 2 worker key(s)" in broker.output(), 10,
               "the broker to read its allowlist again")  # once a second
    late = stack.worker("late", *peer_args(keys, "late"))
    stack.wait_workers("late")

    (keys / "workers" / "late.key").unlink()
    wait_until(lambda: broker.output().count("accepting 1 worker key(s)") == 2, 10,
               "the broker to read its allowlist again")
    output = refused_worker(stack, "late-again", *peer_args(keys, "late"))
    assert "refused this process's CURVE key" in output
    # The connection made before the revocation stays: it serves still.
    with BlockingClient(stack.frontend, curve=peer_keys(keys, "gateway")) as client:
        stream = client.direct("generate", "x", "late")
        assert stream.read() == b"Hello x!\n" and stream.worker_id == "late"
    # A broker restart cuts it: the worker's next connection is refused, and it stops.
    broker.stop()
    late.expect(2)
    stack.broker(*broker_args(keys))
    late.wait(15)
    assert "refused this process's CURVE key" in late.output()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["broker", "serve"])
def test_a_broker_beyond_loopback_needs_keys(tmp_path, command):
    backend = f"tcp://0.0.0.0:{free_port()}"
    result = run_zroute(command, f"--Broker.backend={backend}",
                        f"--Broker.frontend=tcp://127.0.0.1:{free_port()}",
                        f"--Frontend.port={free_port()}")
    assert result.returncode == 2
    assert result.stderr == (
        f"zroute {command}: error: Broker.backend ({backend}) can be reached from other hosts, "
        "and the broker has no CURVE keys: create them with `zroute keys init --dir keys` and "
        "set Broker.curve_secret_key=keys/broker.key_secret (docs/DEPLOY.md), or set "
        "Broker.insecure=true to accept anyone\n")


@pytest.mark.timeout(60)
def test_no_output_shows_a_secret_key(stack, keys):
    debug = ("--log-level", "debug")  # each process logs its configuration
    stack.broker(*broker_args(keys), *debug)
    stack.worker("w1", *peer_args(keys, "w1"), *debug)
    gateway = start_gateway(stack, *peer_args(keys, "gateway", "Frontend.curve_key"), *debug)
    wait_healthy(gateway, 1)
    assert http("POST", f"{gateway.url}/generate", b'{"text": "a"}').status == 200
    outputs = [http("GET", f"{gateway.url}/{path}").body.decode() for path in ("stats", "metrics")]
    outputs.append(run_zroute("stats", "--json", "--broker", stack.frontend, "--log-level",
                              "debug", *peer_args(keys, "gateway", "Frontend.curve_key")).stdout)
    assert "zroute_broker_auth_failures_total" in outputs[1]
    outputs += [proc.output() for proc in stack.procs]
    secrets = [load_certificate(path)[1].decode() for path in keys.glob("*.key_secret")]
    assert len(secrets) == 3
    for output in outputs:
        for secret in secrets:
            assert secret not in output


@pytest.mark.timeout(60)
def test_a_service_with_dependencies_calls_them_with_its_worker_key_in_the_clients_allowlist(
        stack, keys):
    make_keys(keys, ("worker", "caller", "--calls"), ("worker", "solo"))
    stack.cwd = REPO_ROOT
    start_secure_broker(stack, keys)  # with the keys above in its allowlists
    graph = ("--graph", "tests/services.py:Frontend", f"--Broker.frontend={stack.frontend}")
    stack.worker("Backend-1", *graph, "--service-class", "Backend", *peer_args(keys, "w1"))
    for worker_id, key in (("Middle-1", "caller"), ("Middle-2", "solo")):
        stack.worker(worker_id, *graph, "--service-class", "Middle",
                     *peer_args(keys, key, "Middle.curve_key"))
    stack.wait_workers("Backend-1", "Middle-1", "Middle-2", timeout=20)
    with BlockingClient(stack.frontend, curve=peer_keys(keys, "gateway"), timeout=10) as client:
        assert client.direct("Middle.generate", '"a"', "Middle-1").read() == b"HELLO A!\n"
        # A worker key that only the workers' allowlist holds registers, but cannot call.
        refused = client.direct("Middle.refused", '"x"', "Middle-2").read().decode()
    assert refused.startswith("auth_failed: the broker at "), refused


@pytest.mark.timeout(60)
def test_a_tcp_probe_of_the_broker_s_ports_is_neither_counted_nor_logged(secure_stack, keys):
    """Kubernetes' tcpSocket probe (deploy/kubernetes) opens a connection and closes it
    before ZeroMQ's greeting, every few seconds: that is no failed handshake."""
    stack = secure_stack
    for endpoint in (stack.frontend, stack.backend) * 3:
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()
    # Handshakes that succeed after the probes, on both sockets.
    stack.worker("w1", *peer_args(keys, "w1"))
    stack.wait_workers("w1")
    broker = stack.stats()["broker"]
    assert (broker["handshake_failures"], broker["auth_failures"]) == (0, 0), broker
    assert "WARNING" not in stack.procs[0].output()
