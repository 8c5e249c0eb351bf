"""`zroute serve`, end to end: the supervisor starts the broker, the workers and the
gateways as real child processes; requests go through HTTP (aiohttp, and curl if installed)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time

import aiohttp
import pytest

from tests.http_support import (CURL, ROOT, SEED_OUTPUT, SEED_TEXT, alive, async_test, children,
                                cmdline, curl, get_json, http, start_curl, start_time)
from tests.support import (ZROUTE, Proc, Stack, free_port, run_zroute, wait_until,
                           workers_by_id)

pytestmark = pytest.mark.timeout(45)

CONFIG = str(ROOT / "config.yaml")


class Serve:
    """A `zroute serve` process on free ports (HTTP, and the broker's two sockets)."""

    def __init__(self, stack: Stack, *args: str) -> None:
        self.stack = stack
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Proc = stack.start(
            "serve", "serve", "--port", str(self.port), f"--Broker.frontend={stack.frontend}",
            f"--Broker.backend={stack.backend}", *args)

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait for the announcement (printed once /health is ok); return the output."""
        def announced() -> str | None:
            output = self.proc.output()
            assert self.proc.popen.poll() is None, f"serve exited early:\n{output}"
            return output if "\nTry:\n" in output else None
        output = wait_until(announced, timeout, "zroute serve to announce itself")
        assert get_json(f"{self.url}/health")["status"] == "ok"
        return output

    def children(self) -> dict[str, tuple[int, str | None]]:
        """Child name (its --log-name) -> (pid, start time)."""
        found = {}
        for pid in children(self.proc.pid):
            line = cmdline(pid)
            if "--log-name" in line:
                found[line[line.index("--log-name") + 1]] = (pid, start_time(pid))
        return found

    def wait_children(self, *names: str) -> dict[str, tuple[int, str | None]]:
        return wait_until(lambda: (found := self.children()) and sorted(found) == sorted(names)
                          and found, 10, f"the children {names}")

    def stop(self, signum: int) -> int:
        """Send `signum`; wait for the exit, which must be as expected (see Proc)."""
        self.proc.signal(signum)
        return self.proc.wait(20)


def assert_all_gone(kids: dict[str, tuple[int, str | None]]) -> None:
    running = {name: pid for name, (pid, started) in kids.items() if alive(pid, started)}
    assert running == {}, f"children left running: {running}"


@pytest.mark.timeout(40)
@async_test
async def test_serve_without_a_config_file_streams_the_seed_output_and_stops_on_sigterm(stack):
    serve = Serve(stack)  # the built-in defaults: greeting Hello, sleep_time 1, one worker
    output = serve.wait_ready()
    hint = (f"  curl -X POST {serve.url}/generate -H 'Content-Type: application/json' "
            """-d '{"text": "world,universe,galaxy"}'""")
    assert hint in output.splitlines(), output
    kids = serve.wait_children("broker", "Backend-1", "gateway-1")

    async def with_aiohttp() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{serve.url}/generate", json={"text": SEED_TEXT}) as resp:
                assert (resp.status, resp.headers["X-Worker-Id"]) == (200, "Backend-1")
                assert await resp.text() == SEED_OUTPUT

    async def with_the_hint() -> None:  # the announced command, run as printed
        command = shlex.split(hint)
        process = await asyncio.create_subprocess_exec(
            CURL, "-sS", *command[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = await process.communicate()
        assert (process.returncode, stdout.decode()) == (0, SEED_OUTPUT), stderr

    # sleep_time is 1 s: run both clients at once.
    await asyncio.gather(with_aiohttp(), *([with_the_hint()] if CURL else []))

    assert serve.stop(signal.SIGTERM) == 0
    assert_all_gone(kids)
    output = serve.proc.output()
    assert "[serve] INFO stopping: gateways, then workers, then the broker" in output
    assert "Traceback" not in output, output


@async_test
async def test_serve_with_the_config_file_runs_two_workers_and_stops_on_sigint(stack):
    serve = Serve(stack, "-f", CONFIG, "--Backend.sleep_time=0.1")
    output = serve.wait_ready()
    assert f"zroute is serving on {serve.url} (2 worker(s), greeting 'Goodnight', " \
           "routing round_robin)" in output
    assert "runs one process" not in output  # serve's children are not told they are one
    kids = serve.wait_children("broker", "Backend-1", "Backend-2", "gateway-1")
    expected = "Goodnight sun!\nGoodnight moon!\nGoodnight stars!\n"
    body = b'{"text": "sun,moon,stars"}'

    served = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(f"{serve.url}/generate", data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                assert (resp.status, await resp.text()) == (200, expected)
                served.append(resp.headers["X-Worker-Id"])
    assert sorted(served) == ["Backend-1", "Backend-2"]  # round robin
    if CURL:
        result = curl(f"{serve.url}/generate", body=body)
        assert (result.returncode, result.status, result.body.decode()) == (0, 200, expected)

    stats = get_json(f"{serve.url}/stats")
    workers = workers_by_id(stats)
    assert sorted(workers) == ["Backend-1", "Backend-2"]
    assert {w["state"] for w in workers.values()} == {"ready"}
    assert sum(w["completed"] for w in workers.values()) == (3 if CURL else 2)

    assert serve.stop(signal.SIGINT) == 0
    assert_all_gone(kids)
    assert "Traceback" not in serve.proc.output()


@async_test
async def test_serve_restarts_a_worker_killed_with_sigkill(stack):
    serve = Serve(stack, "--Backend.sleep_time=0", "--log-level", "debug")
    serve.wait_ready()
    kids = serve.wait_children("broker", "Backend-1", "gateway-1")
    old = kids["Backend-1"]
    old_pid = old[0]
    # Debug lines say what serve ran, and the children pass the level on.
    output = serve.proc.output()
    assert f"[serve] DEBUG started Backend-1, pid {old_pid}: " in output, output
    assert "[Backend-1] DEBUG configuration: " in output and "[broker] DEBUG policies: " in output
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> tuple[int, str | None] | None:
        new = serve.children().get("Backend-1")
        return new if new and new[0] != old_pid else None

    new_pid, _ = wait_until(restarted, 10, "serve to start Backend-1 again")
    assert ("[serve] WARNING Backend-1 exited with code -9; restarting in 0.5 s"
            in serve.proc.output())
    assert ("[serve] DEBUG restarting Backend-1; the next back-off is 1.0 s"
            in serve.proc.output())

    # The new process registers as Backend-1 (the broker forgets the dead one) and serves.
    def served_by_worker_1() -> bool:
        reply = http("POST", f"{serve.url}/generate?worker=Backend-1", b'{"text": "again"}')
        return reply is not None and reply.status == 200 and reply.body == b"Hello again!\n" \
            and reply.headers["x-worker-id"] == "Backend-1"

    wait_until(served_by_worker_1, 15, "the restarted Backend-1 to serve")
    stats = get_json(f"{serve.url}/stats")
    assert workers_by_id(stats)["Backend-1"]["state"] == "ready"
    assert workers_by_id(stats)["Backend-1"]["completed"] == 1  # counted for the new registration
    output = serve.proc.output()
    assert output.count("[broker] INFO worker Backend-1 ready for generate") == 2, output
    assert serve.children()["Backend-1"][0] == new_pid

    kids = serve.children()
    assert serve.stop(signal.SIGTERM) == 0
    assert_all_gone(kids)
    assert not alive(*old)



def test_a_worker_whose_restart_fails_at_once_is_restarted_again_and_serve_stays_up(
        stack, tmp_path):
    config = tmp_path / "zroute.yaml"
    config.write_text("Backend:\n  sleep_time: 0\n")
    serve = Serve(stack, "-f", str(config))
    serve.wait_ready()
    kids = serve.wait_children("broker", "Backend-1", "gateway-1")
    # Its restart reads the file again and exits 2 at once, as a first start that fails
    # would: only a first start's failure stops serve.
    config.write_text("Backend:\n  sleep_time: -1\n")
    os.kill(kids["Backend-1"][0], signal.SIGKILL)
    wait_until(lambda: "[serve] WARNING Backend-1 exited with code 2; restarting in 1.0 s"
               in serve.proc.output(), 10, "the failed restart to be restarted again")
    assert serve.proc.alive, serve.proc.output()

    config.write_text("Backend:\n  sleep_time: 0\n")
    wait_until(lambda: (reply := http("POST", f"{serve.url}/generate?worker=Backend-1",
                                      b'{"text": "again"}')) and reply.status == 200,
               20, "the restarted Backend-1 to serve")
    assert serve.proc.alive and "ERROR" not in serve.proc.output(), serve.proc.output()
    kids = serve.children()
    assert serve.stop(signal.SIGTERM) == 0
    assert_all_gone(kids)

@async_test
async def test_serve_runs_two_gateways_on_one_port(stack):
    serve = Serve(stack, "--Backend.sleep_time=0", "--Frontend.ServiceArgs.workers=2")
    serve.wait_ready()
    kids = serve.wait_children("broker", "Backend-1", "gateway-1", "gateway-2")

    def answered_by(name: str) -> int:
        return serve.proc.output().count(f"[{name}] INFO request=")

    # Each new connection lands on one of the two listening processes; send until both served.
    deadline = time.monotonic() + 15
    requests = 0
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection per request
    async with aiohttp.ClientSession(connector=connector) as session:
        while not (answered_by("gateway-1") and answered_by("gateway-2")):
            assert time.monotonic() < deadline, "one gateway served every request"
            async with session.post(f"{serve.url}/generate", json={"text": SEED_TEXT}) as resp:
                assert (resp.status, await resp.text()) == (200, SEED_OUTPUT)
            requests += 1
    wait_until(lambda: answered_by("gateway-1") + answered_by("gateway-2") == requests, 5,
               "every request to be logged")
    assert len({pid for pid, _ in kids.values()}) == 4

    assert serve.stop(signal.SIGTERM) == 0
    assert_all_gone(kids)


@pytest.mark.timeout(20)
def test_serve_with_a_bad_value_exits_2_with_one_line_naming_the_key():
    result = subprocess.run(
        [ZROUTE, "serve", "--port", str(free_port()),
         f"--Broker.frontend=tcp://127.0.0.1:{free_port()}",
         f"--Broker.backend=tcp://127.0.0.1:{free_port()}", "--Backend.sleep_time=-1"],
        capture_output=True, text=True, timeout=15)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("zroute serve: error: Backend.sleep_time: -1 is invalid: "
                             "must be a number >= 0\n")


@pytest.mark.timeout(40)
@async_test
async def test_serve_shutdown_finishes_the_requests_in_flight(stack):
    serve = Serve(stack, "--Backend.sleep_time=0.4", "--Backend.ServiceArgs.workers=2")
    serve.wait_ready()
    kids = serve.wait_children("broker", "Backend-1", "Backend-2", "gateway-1")
    words = "a,b,c,d"
    expected = "".join(f"Hello {w}!\n" for w in words.split(","))
    async with aiohttp.ClientSession() as session:
        async def one() -> str:
            async with session.post(f"{serve.url}/generate", json={"text": words}) as response:
                first = await response.content.readline()
                started.set()
                return first.decode() + (await response.text())

        started = asyncio.Event()
        requests = [asyncio.create_task(one()) for _ in range(6)]
        await started.wait()
        serve.proc.signal(signal.SIGTERM)  # while all six are streaming
        replies = await asyncio.wait_for(asyncio.gather(*requests), 20)
    assert replies == [expected] * 6  # nothing was cut
    assert serve.proc.popen.wait(20) == 0
    assert_all_gone(kids)


# --- ports: two stacks never share one ----------------------------------------------


def listening_socket(port: int) -> socket.socket:
    """A plain listener on 127.0.0.1:`port`, as any other program would hold it; it even
    allows SO_REUSEPORT, as a gateway does."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    return holder


def port_of(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


@pytest.mark.parametrize("shared", ["http", "frontend", "backend"])
def test_a_second_serve_on_a_port_of_the_first_exits_with_one_line_naming_it(stack, shared):
    first = Serve(stack, "--Backend.sleep_time=0")
    first.wait_ready()
    kids = first.wait_children("broker", "Backend-1", "gateway-1")
    ports = {"http": first.port, "frontend": port_of(stack.frontend),
             "backend": port_of(stack.backend)}
    mine = {name: free_port() for name in ports}
    mine[shared] = ports[shared]
    second = run_zroute("serve", "--port", str(mine["http"]),
                        f"--Broker.frontend=tcp://127.0.0.1:{mine['frontend']}",
                        f"--Broker.backend=tcp://127.0.0.1:{mine['backend']}")
    assert (second.returncode, second.stdout) == (1, "")
    message, hint = second.stderr.split("; ")
    assert message == (
        f"zroute serve: error: port {ports[shared]} is in use by pid {first.proc.pid} "
        f"(zroute serve --port {first.port} --Broker.frontend={stack.frontend} "
        f"--Broker.backend={stack.backend} --Backend.sleep_time=0)")
    # A second stack is guided: a free port for the one that is taken.
    flag = {"http": "--port ", "frontend": "--Broker.frontend=tcp://127.0.0.1:",
            "backend": "--Broker.backend=tcp://127.0.0.1:"}[shared]
    suggested = re.fullmatch(f"to run a second stack, give it other ports too: {flag}(\\d+)\n",
                             hint)
    assert suggested and int(suggested[1]) > ports[shared], hint
    # The first stack goes on alone: nothing restarted, it still serves.
    assert first.children() == kids
    assert http("POST", f"{first.url}/generate", b'{"text": "a"}').body == b"Hello a!\n"
    assert "exited" not in first.proc.output()


def test_a_second_serve_on_the_default_ports_runs_with_the_ports_it_is_told(stack, tmp_path):
    first = Serve(stack, "--Backend.sleep_time=0")
    first.wait_ready()
    # The second one shares the broker's ports, as it would with the defaults for both.
    second_port = free_port()
    told = run_zroute("serve", "--port", str(second_port), f"--Broker.frontend={stack.frontend}",
                      f"--Broker.backend={stack.backend}")
    assert told.returncode == 1, told.stderr
    flags = told.stderr.split("give it other ports too: ")[1].split()
    assert [flag.partition("=")[0] for flag in flags] == ["--Broker.frontend", "--Broker.backend"]
    (tmp_path / "second").mkdir()
    second_stack = Stack(tmp_path / "second")
    try:
        second = Serve(second_stack, *flags, "--Backend.sleep_time=0")  # the later flags win
        second.wait_ready()
        reply = http("POST", f"{second.url}/generate", b'{"text": "b"}')
        assert (reply.status, reply.body) == (200, b"Hello b!\n")
    finally:
        second_stack.close()


def test_serve_refuses_an_http_port_that_is_a_broker_port_before_starting_anything(stack):
    port = free_port()
    result = run_zroute("serve", "--host", "0.0.0.0", "--port", str(port),
                        f"--Broker.frontend={stack.frontend}",
                        f"--Broker.backend=tcp://127.0.0.1:{port}")
    assert (result.returncode, result.stdout, result.stderr) == (2, "", (
        f"zroute serve: error: Frontend.port ({port}) and Broker.backend "
        f"(tcp://127.0.0.1:{port}) are the same port: the gateway and the broker each need "
        "their own\n"))


def test_serve_refuses_a_host_that_does_not_resolve_before_starting_anything(stack):
    result = run_zroute("serve", "--host", "no-such-host.invalid", "--port", str(free_port()),
                        f"--Broker.frontend={stack.frontend}", f"--Broker.backend={stack.backend}")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("zroute serve: error: --host: the host "
                                    "'no-such-host.invalid' does not resolve (")
    assert result.stderr.endswith("): give an IP address such as 127.0.0.1, ::1 or 0.0.0.0, "
                                  "or a name this machine resolves\n")


def test_standalone_components_on_a_port_of_serve_exit_with_one_line_naming_it(stack):
    serve = Serve(stack, "--Backend.sleep_time=0")
    serve.wait_ready()
    gateway = run_zroute("gateway", "--broker", stack.frontend, "--port", str(serve.port))
    other = f"tcp://127.0.0.1:{free_port()}"
    broker = run_zroute("broker", "--frontend", stack.frontend, "--backend", other)
    frontend_port = stack.frontend.rpartition(":")[2]
    for command, result, port in (("gateway", gateway, serve.port),
                                  ("broker", broker, frontend_port)):
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"zroute {command}: error: port {port} is in use by pid {serve.proc.pid} "
            "(zroute serve --port "), result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_serve_does_not_start_on_a_port_another_program_listens_on(stack):
    port = free_port()
    with listening_socket(port):
        result = run_zroute("serve", "--port", str(port), f"--Broker.frontend={stack.frontend}",
                            f"--Broker.backend={stack.backend}")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"zroute serve: error: port {port} is in use by pid "
                                    f"{os.getpid()} (")  # this test's process
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_a_broker_that_cannot_listen_when_restarted_stops_serve_with_one_line(stack):
    serve = Serve(stack, "--Backend.sleep_time=0")
    serve.wait_ready()
    kids = serve.wait_children("broker", "Backend-1", "gateway-1")
    os.kill(kids["broker"][0], signal.SIGKILL)
    serve.proc.expect(1)  # it stops: the broker cannot be restarted

    def take_the_port() -> socket.socket | None:
        try:
            return listening_socket(port_of(stack.frontend))
        except OSError:
            return None  # the dead broker's connections still close

    # Another program takes the broker's port before serve restarts it (0.5 s).
    with wait_until(take_the_port, 5, "the broker's port to be free"):
        code = serve.proc.popen.wait(20)  # not restarted forever
    output = serve.proc.output()
    assert code == 1, output
    assert (f"[serve] ERROR broker cannot listen: port {port_of(stack.frontend)} is in use by pid "
            f"{os.getpid()} (") in output
    assert output.count("[serve] WARNING broker exited with code -9; restarting") == 1, output
    assert_all_gone(kids)


# --- stopping: say what drains, end every cut stream visibly --------------------------

LONG_TEXT = ",".join(f"w{i}" for i in range(200))


async def streaming(serve: Serve) -> asyncio.subprocess.Process:
    """A curl streaming a long reply from `serve`, once its first line has arrived."""
    process = await start_curl(f"{serve.url}/generate", b'{"text": "%s"}' % LONG_TEXT.encode())
    assert await asyncio.wait_for(process.stdout.readline(), 10) == b"Hello w0!\n"
    return process


def wait_stopping(serve: Serve) -> str:
    """Wait until serve says that it stops; return its output."""
    def said() -> str | None:
        output = serve.proc.output()
        return output if "[serve] INFO stopping" in output else None
    return wait_until(said, 10, "serve to say that it stops")


@pytest.mark.skipif(not CURL, reason="curl is not installed")
@async_test
async def test_ctrl_c_says_what_drains_and_ends_a_cut_stream_with_an_error_line(stack):
    serve = Serve(stack, "--Backend.sleep_time=0.2", "--Frontend.drain_timeout=1")
    serve.wait_ready()
    kids = serve.wait_children("broker", "Backend-1", "gateway-1")
    curl_process = await streaming(serve)
    serve.proc.signal(signal.SIGINT)
    assert ("[serve] INFO stopping: gateways, then workers, then the broker; 1 request(s) in "
            "flight; waiting up to 1 s (Ctrl-C again to stop at once)") in wait_stopping(serve)
    rest, stderr = await asyncio.wait_for(curl_process.communicate(), 15)
    # The stream went on for the drain timeout, then ended with the usual last line,
    # without the terminating chunk: curl calls the transfer incomplete.
    lines = rest.decode().splitlines()
    assert lines[0] == "Hello w1!" and len(lines) < 199, lines
    assert lines[-1] == ("error: gateway_stopping: the gateway stopped before the reply "
                         "finished"), lines
    assert curl_process.returncode == 18, stderr
    assert serve.proc.popen.wait(20) == 0
    assert_all_gone(kids)
    assert "Traceback" not in serve.proc.output()


@pytest.mark.skipif(not CURL, reason="curl is not installed")
@async_test
async def test_a_second_ctrl_c_stops_everything_at_once(stack):
    serve = Serve(stack, "--Backend.sleep_time=0.2")  # the default drain: 30 s
    serve.wait_ready()
    kids = serve.wait_children("broker", "Backend-1", "gateway-1")
    curl_process = await streaming(serve)
    serve.proc.signal(signal.SIGINT)
    wait_stopping(serve)
    serve.proc.expect(1)  # stopped at once
    serve.proc.signal(signal.SIGINT)
    assert serve.proc.popen.wait(5) == 1
    assert_all_gone(kids)
    rest, _ = await asyncio.wait_for(curl_process.communicate(), 5)
    # Cut, and it shows: a last error line, and an incomplete transfer.
    assert rest.decode().splitlines()[-1].startswith("error: "), rest
    assert curl_process.returncode == 18
    assert "[serve] WARNING stopped at once: requests in flight were cut" in serve.proc.output()


@pytest.mark.skipif(not CURL, reason="curl is not installed")
@async_test
async def test_serve_started_while_the_old_stack_drains_says_it_is_still_stopping(stack):
    old = Serve(stack, "--Backend.sleep_time=0.2")
    old.wait_ready()
    curl_process = await streaming(old)
    old.proc.signal(signal.SIGINT)
    wait_stopping(old)
    new = run_zroute("serve", "--port", str(old.port), f"--Broker.frontend={stack.frontend}",
                     f"--Broker.backend={stack.backend}", "--Backend.sleep_time=0.2")
    assert new.returncode == 1
    # The HTTP port, if the old gateway still listens, else the old broker's.
    port = int(new.stderr.split()[4])
    assert port in (old.port, port_of(stack.frontend)), new.stderr
    assert new.stderr == (
        f"zroute serve: error: port {port} is in use by pid {old.proc.pid} "
        f"(zroute serve --port {old.port} --Broker.frontend={stack.frontend} "
        f"--Broker.backend={stack.backend} --Backend.sleep_time=0.2), which is still "
        "stopping: wait until it exits, or press Ctrl-C again where it runs to stop it "
        "at once\n")
    old.proc.expect(1)  # a second Ctrl-C stops it at once
    old.proc.signal(signal.SIGINT)
    old.proc.popen.wait(10)
    await asyncio.wait_for(curl_process.communicate(), 5)


# --- options and logs ----------------------------------------------------------------


@pytest.mark.parametrize("host, url_host, elsewhere", [
    ("127.0.0.2", "127.0.0.2", "127.0.0.1"),
    ("::1", "[::1]", "127.0.0.1"),
    ("[::1]", "[::1]", "127.0.0.1"),  # as in a URL
    ("0.0.0.0", "127.0.0.1", None),  # announced as a URL that works from this machine
])
def test_serve_listens_on_the_host_given_by_host(stack, host, url_host, elsewhere):
    port = free_port()
    serve = stack.start("serve", "serve", "--host", host, "--port", str(port),
                        f"--Broker.frontend={stack.frontend}", f"--Broker.backend={stack.backend}",
                        "--Backend.sleep_time=0")
    url = f"http://{url_host}:{port}"
    wait_until(lambda: f"zroute is serving on {url} " in serve.output(), 30,
               f"serve to announce itself on {url}")
    reply = http("POST", f"{url}/generate", b'{"text": "a"}')
    assert (reply.status, reply.body) == (200, b"Hello a!\n")
    if elsewhere:
        assert http("GET", f"http://{elsewhere}:{port}/health") is None  # not there
    assert serve.stop() == 0


def test_serve_with_a_host_it_cannot_listen_on_exits_with_one_line(stack):
    port = free_port()
    result = run_zroute("serve", "--host", "192.0.2.1", "--port", str(port),  # TEST-NET-1
                        f"--Broker.frontend={stack.frontend}", f"--Broker.backend={stack.backend}")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"zroute serve: error: cannot listen on 192.0.2.1:{port}: "
                             "Cannot assign requested address\n")


ANNOUNCEMENT = ("", "zroute is serving on ", "Try:", "  curl ")  # on stdout, for people


def test_serve_logs_json_lines_with_the_per_request_fields(stack):
    serve = Serve(stack, "--log-format", "json", "--Backend.sleep_time=0")
    serve.wait_ready()
    assert http("POST", f"{serve.url}/generate", b'{"text": "a,b"}').status == 200
    assert serve.stop(signal.SIGTERM) == 0
    lines = [line for line in serve.proc.output().splitlines()
             if not any(line.startswith(start) if start else line == start
                        for start in ANNOUNCEMENT)]
    entries = [json.loads(line) for line in lines]  # every other line is one JSON object
    by_process: dict[str, list[dict]] = {}
    for entry in entries:
        by_process.setdefault(entry["process"], []).append(entry)
    assert any(e["message"].startswith("stopping: gateways, then workers, then the broker")
               for e in by_process["serve"]), by_process["serve"]

    [request] = [e for e in by_process["gateway-1"] if "status" in e]
    assert {k: request[k] for k in ("policy", "worker", "status", "chunks")} == {
        "policy": "round_robin", "worker": "Backend-1", "status": 200, "chunks": 2}
    assert isinstance(request["duration"], float) and isinstance(request["ttfc"], float)
    assert request["message"].startswith(f"request={request['request']} policy=round_robin ")

    [served] = [e for e in by_process["Backend-1"] if "chunks" in e]
    assert (served["worker"], served["chunks"]) == ("Backend-1", 2)
    assert served["message"].endswith(" ok")
