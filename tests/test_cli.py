"""The `zroute` command's own options, and `zroute stats --watch` through a broker outage."""

from __future__ import annotations

import signal
from importlib.metadata import version

import pytest

from tests.support import run_zroute, wait_until

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
