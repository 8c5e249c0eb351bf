"""The README's custom policy, used as the README shows it: a module in the directory
that real processes start from, named as module:Class."""

from __future__ import annotations

import pytest

from zroute.client import BlockingClient, BrokerError
from tests.http_support import CURL, curl, get_json, http, start_gateway, wait_healthy
from tests.support import Stack, free_port, readme_example, run_zroute, wait_until
from tests.test_serve import Serve

POLICY = "mymodule:FewestCompleted"
BODY = b'{"text": "a,b"}'


@pytest.fixture
def project(tmp_path):
    """A user's directory with the README's mymodule.py in it."""
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "mymodule.py").write_text(readme_example("#### A custom policy"))
    return directory


def post(url: str, query: str = ""):
    reply = http("POST", f"{url}/generate{query}", BODY, timeout=10)
    assert reply is not None
    return reply


def served_after_two_on_backend_1(url: str, query: str = "") -> list[str]:
    """Two requests to Backend-1, then three more with `query`: the workers that served
    those three. FewestCompleted sends them to Backend-2, Backend-2, then Backend-1 (a tie
    goes to the first); round robin would begin with Backend-1."""
    for _ in range(2):
        assert post(url, "?worker=Backend-1").status == 200
    return [post(url, query).headers["x-worker-id"] for _ in range(3)]


@pytest.mark.timeout(60)
def test_broker_worker_and_gateway_route_by_the_readme_policy(stack: Stack, project):
    stack.cwd = project
    stack.broker(f"--Frontend.routing_mode={POLICY}")
    for worker_id in ("Backend-1", "Backend-2"):
        stack.worker(worker_id)
    stack.wait_workers("Backend-1", "Backend-2")
    gateway = start_gateway(stack, f"--Frontend.routing_mode={POLICY}")
    wait_healthy(gateway, 2)
    served = served_after_two_on_backend_1(gateway.url)
    assert served == ["Backend-2", "Backend-2", "Backend-1"]
    reply = post(gateway.url, f"?routing={POLICY}")
    assert (reply.status, reply.body) == (200, b"Hello a!\nHello b!\n")
    if CURL:
        result = curl(f"{gateway.url}/generate?routing={POLICY}", body=BODY)
        assert (result.status, result.body) == (200, b"Hello a!\nHello b!\n")
    with BlockingClient(stack.frontend, timeout=10) as client:
        assert b"".join(client.request("generate", {"text": "c"}, policy=POLICY)) == b"Hello c!\n"
    unknown = post(gateway.url, "?routing=mymodule:Other")
    assert unknown.status == 400
    assert unknown.json() == {"code": "unknown_policy", "error": (
        "unknown routing policy 'mymodule:Other' (valid: round_robin, random, least_loaded, "
        f"power_of_two, {POLICY}, direct)")}


@pytest.mark.timeout(60)
def test_broker_policy_flag_lets_requests_name_the_class(stack: Stack, project):
    stack.cwd = project
    stack.broker("--policy", POLICY)
    stack.worker("w1")
    stack.worker("w2")
    stack.wait_workers("w1", "w2")
    with BlockingClient(stack.frontend, timeout=10) as client:
        for _ in range(2):
            assert list(client.direct("generate", {"text": "c"}, "w1")) == [b"Hello c!\n"]
        served = []
        for _ in range(3):  # by FewestCompleted; round robin would begin with w1
            stream = client.request("generate", {"text": "c"}, policy=POLICY)
            assert b"".join(stream) == b"Hello c!\n"
            served.append(stream.worker_id)
        with pytest.raises(BrokerError) as refused:
            list(client.request("generate", {"text": "c"}, policy="mymodule:Other"))
    assert served == ["w2", "w2", "w1"]
    assert refused.value.code == "unknown_policy"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option, query", [
    (f"--Frontend.routing_mode={POLICY}", ""),
    (f"--Broker.policies={POLICY}", f"?routing={POLICY}"),
], ids=["routing_mode", "policies"])
def test_zroute_serve_as_the_readme_shows_it(stack: Stack, project, option, query):
    stack.cwd = project
    serve = Serve(stack, "--Backend.sleep_time=0", "--Backend.ServiceArgs.workers=2", option)
    serve.wait_ready()
    wait_until(lambda: get_json(f"{serve.url}/health") == {"status": "ok", "workers": 2}, 15,
               "both workers to register")
    assert served_after_two_on_backend_1(serve.url, query) == ["Backend-2", "Backend-2", "Backend-1"]
    reply = post(serve.url, query)
    assert (reply.status, reply.body) == (200, b"Hello a!\nHello b!\n")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("option, error", [
    ("--Frontend.routing_mode=bogus",
     "Frontend.routing_mode: unknown routing policy 'bogus' "
     "(valid: round_robin, random, least_loaded, power_of_two)"),
    ("--Frontend.routing_mode=direct",
     "Frontend.routing_mode: 'direct' needs a worker per request (?worker=), so it cannot be "
     "the default; use one of round_robin, random, least_loaded, power_of_two"),
    ("--Broker.policies=mymodule:Missing",
     "Broker.policies 'mymodule:Missing' cannot be loaded: 'mymodule' has no attribute 'Missing'"),
    ("--Frontend.routing_mode=nomodule:Policy",
     "Frontend.routing_mode 'nomodule:Policy' cannot be loaded: no module named 'nomodule' "
     "in the current directory ({cwd}) or the installed packages"),
], ids=["unknown", "direct", "missing-class", "missing-module"])
@pytest.mark.parametrize("command", ["broker", "serve"])
def test_policies_that_do_not_load_stop_the_broker_and_serve_with_one_line(project, option,
                                                                           error, command):
    result = run_zroute(command, f"--Broker.frontend=tcp://127.0.0.1:{free_port()}",
                        f"--Broker.backend=tcp://127.0.0.1:{free_port()}", option, cwd=project)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"zroute {command}: error: {error.format(cwd=project)}\n"
