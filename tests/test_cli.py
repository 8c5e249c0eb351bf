"""The `zroute` command's own options, and `zroute stats --watch` through a broker outage."""

from __future__ import annotations

import signal
import socket
import subprocess
from importlib.metadata import version

import pytest

from tests.support import REPO_ROOT, ZROUTE, free_port, run_zroute, wait_until
from zroute_cli.main import main

CLEAR_SCREEN = "\033[H\033[2J"


@pytest.mark.timeout(20)
def test_version_prints_the_package_version():
    result = run_zroute("--version")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"zroute {version('zroute')}\n", "")


@pytest.mark.timeout(40)
def test_stats_watch_waits_for_a_broker_that_is_down_and_shows_it_when_it_comes_up(stack):
    watch = stack.start("stats", "stats", "--watch", "--broker", stack.frontend)

    def frames() -> list[str]:
        assert watch.alive, f"stats --watch exited:\n{watch.output()}"
        return watch.output().split(CLEAR_SCREEN)[1:]

    down = f"broker unreachable at {stack.frontend} (retrying)\n"
    # Without --watch it would give up after its 5 s --timeout; it goes on refreshing.
    wait_until(lambda: len(frames()) >= 7, 15, "seven refreshes without a broker")
    assert set(frames()) == {down}

    stack.broker()
    wait_until(lambda: "(no workers)" in frames()[-1], 10, "the table once the broker is up")
    watch.signal(signal.SIGINT)
    assert watch.popen.wait(10) == 0
    assert "Traceback" not in watch.output()


SERVE_USAGE = "usage: zroute serve [-h] [--host HOST] [--port PORT] [-f FILE]"


def refusal(capsys, *argv: str) -> str:
    """The one error line of `zroute ARGV`, which must exit 2 after the usage of
    the subcommand it names."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    usage, *_, error = stderr.splitlines()
    assert usage.startswith(f"usage: zroute {argv[0]} ") and "Traceback" not in stderr, stderr
    return error


@pytest.mark.parametrize("argv, error", [
    (("serve", "--prot", "9000"), "unrecognized argument '--prot': did you mean --port?"),
    (("gateway", "--brokr", "tcp://127.0.0.1:5555"),
     "unrecognized argument '--brokr': did you mean --broker?"),
    (("worker", "--servce=x"), "unrecognized argument '--servce=x': did you mean --service?"),
    (("serve", "--nothing-like-it"),
     "unrecognized argument '--nothing-like-it': see zroute serve --help"),
    # A configuration key with the wrong case, or a typo in its section.
    (("serve", "--backend.greeting=Hi"),
     "unrecognized argument '--backend.greeting=Hi': did you mean --Backend.greeting=Hi?"),
    (("serve", "--backnd.ServiceArgs.workers=2"),
     "unrecognized argument '--backnd.ServiceArgs.workers=2': did you mean "
     "--Backend.ServiceArgs.workers=2?"),
    (("worker", "--Backend.greeting", "Hi"),
     "override '--Backend.greeting' has no value: the form is --Backend.greeting=Hi"),
    (("worker", "extra"),
     "unexpected argument 'extra': zroute worker takes options only; see zroute worker --help"),
])
def test_an_unknown_argument_is_refused_by_its_subcommand_with_a_hint(capsys, argv, error):
    assert refusal(capsys, *argv) == f"zroute {argv[0]}: error: {error}"


@pytest.mark.timeout(20)
def test_serve_given_a_graph_that_does_not_load_says_so_in_one_line():
    # As in `dynamo serve routed_pipeline:Frontend -f config.yaml`, without that module.
    result = run_zroute("serve", "routed_pipeline:Frontend", "-f", "config.yaml", cwd=REPO_ROOT)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "zroute serve: error: the graph 'routed_pipeline:Frontend' cannot be loaded: no module "
        f"named 'routed_pipeline' in the current directory ({REPO_ROOT}) or the installed packages\n")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("argv, error", [
    (("stats", "--timeout", "-1"), "--timeout -1 is invalid: must be a number of seconds > 0"),
    (("worker", "--service", ""),
     "--service '' is empty: give a name of printable characters, at most 255 bytes "
     "(e.g. --service generate)"),
    (("worker", "--id", ""),
     "--id '' is empty: give a name of printable characters, at most 255 bytes "
     "(e.g. --id worker-1)"),
], ids=["timeout", "service", "id"])
def test_a_value_the_command_cannot_use_is_one_line_and_exit_2(argv, error):
    result = run_zroute(*argv)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"zroute {argv[0]}: error: {error}\n")


@pytest.mark.timeout(30)
def test_stats_table_shows_each_workers_services_and_capacity(stack):
    stack.broker()
    stack.worker("w1")
    stack.worker("w2", "--service", "upper", "--service", "generate", "--capacity", "3")
    stack.wait_workers("w1", "w2")
    table = run_zroute("stats", "--broker", stack.frontend)
    assert (table.returncode, table.stderr) == (0, "")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["WORKER", "SERVICES", "STATE", "INFLIGHT", "CAPACITY"]
    assert [line.split()[:5] for line in lines[1:3]] == [
        ["w1", "generate", "ready", "0", "unlimited"],
        ["w2", "generate,upper", "ready", "0", "3"]]


@pytest.mark.timeout(30)
def test_a_worker_count_outside_serve_is_said_to_be_ignored(stack, tmp_path):
    config = tmp_path / "gw.yaml"
    config.write_text("Frontend:\n  ServiceArgs:\n    workers: 3\n")
    gateway = stack.start("gateway", "gateway", "--broker", stack.frontend,
                          "--port", str(free_port()), "-f", str(config))
    worker = stack.worker("w1", "--Backend.ServiceArgs.workers=2")
    for proc, line in (
            (gateway, "INFO Frontend.ServiceArgs.workers is 3, but zroute gateway runs one "
                      "process; `zroute serve` runs 3"),
            (worker, "INFO Backend.ServiceArgs.workers is 2, but zroute worker runs one "
                     "process; `zroute serve` runs 2")):
        wait_until(lambda: line in proc.output(), 10, f"{proc.name} to say: {line}")


@pytest.mark.timeout(30)
def test_stats_into_a_pipe_closed_early_exits_quietly(stack):
    """`zroute stats --json | head -c 100`: a reader that has had enough is no error."""
    stack.broker()
    stack.wait_stats(lambda stats: True)
    proc = subprocess.Popen([ZROUTE, "stats", "--json", "--broker", stack.frontend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before anything is written: every write fails with EPIPE
    _, stderr = proc.communicate(timeout=20)
    assert (proc.returncode, stderr) == (0, b"")


@pytest.mark.timeout(30)
def test_sigterm_before_a_worker_serves_ends_it_with_code_0(tmp_path):
    """A process told to stop while it starts (here: importing a slow handler module) has
    nothing to drain: it ends as it would a moment later, with code 0."""
    started = tmp_path / "importing"
    (tmp_path / "slow_start.py").write_text(
        "import pathlib, time\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "time.sleep(60)\n"
        "async def handler(request):\n    yield ''\n")
    worker = subprocess.Popen([ZROUTE, "worker", "--broker", f"tcp://127.0.0.1:{free_port()}",
                               "--handler", "slow_start:handler"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(started.exists, 20, "the worker to import its handler module")
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=10)
    assert worker.returncode == 0, output.decode()
    assert b"stopped before serving" in output and b"Traceback" not in output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["gateway", "worker", "broker"])
def test_sigterm_as_soon_as_a_component_says_it_is_up_ends_it_with_code_0(command):
    """SIGTERM right after a component's first line (the gateway's "listening" comes just
    before its event loop sets its own handler): exit code 0 and no traceback."""
    port, other = free_port(), free_port()
    args = {"gateway": ["--broker", f"tcp://127.0.0.1:{other}", "--port", str(port)],
            "worker": ["--broker", f"tcp://127.0.0.1:{other}"],
            "broker": ["--frontend", f"tcp://127.0.0.1:{port}",
                       "--backend", f"tcp://127.0.0.1:{other}"]}[command]
    for _ in range(3):
        proc = subprocess.Popen([ZROUTE, command, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        output = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        output += proc.communicate(timeout=20)[0]
        assert proc.returncode == 0, output.decode()
        assert b"Traceback" not in output, output.decode()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["broker", "worker", "gateway", "serve", "stats"])
def test_check_says_a_valid_configuration_is_valid_and_starts_nothing(command, tmp_path):
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"Broker:\n  frontend: tcp://127.0.0.1:{port}\n")
    result = run_zroute(command, "-f", str(config), "--Broker.max_retries=1", "--check")
    assert (result.returncode, result.stdout) == (
        0, f"zroute {command}: the configuration is valid\n"), result.stderr
    with socket.create_server(("127.0.0.1", port)):
        pass  # nothing bound the port


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command, args, problem", [
    ("worker", ["--Backend.greting=Hi"], "unknown key 'Backend.greting'"),
    ("worker", ["--id", "a b\n"], "--id 'a b\\n' has a control or unprintable character"),
    ("gateway", ["--port", "0"], "Frontend.port: 0 is invalid"),
    ("gateway", ["--Frontend.tls_cert=cert.pem"], "Frontend.tls_cert is set but not"),
    ("broker", ["--frontend", "tcp://0.0.0.0:5555"], "Broker.frontend (tcp://0.0.0.0:5555) "
                                                     "can be reached from other hosts"),
    ("serve", ["--Broker.backend=tcp://0.0.0.0:5556"], "can be reached from other hosts"),
    ("serve", ["--Frontend.routing_mode=nosuch"], "unknown routing policy 'nosuch'"),
    ("broker", ["--Broker.policies=nosuch:Policy"], "no module named 'nosuch'"),
])
def test_check_says_what_is_wrong_with_a_configuration(command, args, problem):
    result = run_zroute(command, *args, "--check")
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"zroute {command}: error: ") and problem in result.stderr, \
        result.stderr
