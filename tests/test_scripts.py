"""The scripts as a newcomer runs them: in a fresh clone with no .venv, with arguments."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.http_support import ROOT, http
from tests.support import Proc, free_port, wait_until

# Each run creates a .venv and installs the project from the package index.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def fresh_clone(dest: Path) -> Path:
    """A clone of this repository's HEAD, plus the working tree's uncommitted files,
    so that what runs is what is on disk."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(dest)],
                   check=True, timeout=60)
    subprocess.run(["git", "checkout", "--quiet", head], cwd=dest, check=True, timeout=60)
    changed = subprocess.run(
        ["git", "ls-files", "-z", "--modified", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, changed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    assert not (dest / ".venv").exists()
    return dest


def newcomer_env() -> dict[str, str]:
    """This environment without the test run's virtualenv: a plain shell's."""
    ours = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != ours)
    return env


def test_run_all_and_test_sh_take_arguments_in_a_fresh_clone(tmp_path):
    clone = fresh_clone(tmp_path / "zroute")
    env = newcomer_env()

    # test.sh's set-up path, with an argument for pytest (not the whole suite).
    result = subprocess.run([str(clone / "scripts" / "test.sh"), "--version"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "creating" in result.stderr and "pytest" in result.stdout + result.stderr

    # From a project directory of the user's, with a config file of theirs there: it is
    # found, and it wins over the repository's config.yaml.
    project = tmp_path / "project"
    project.mkdir()
    (project / "my.yaml").write_text("Backend:\n  ServiceArgs:\n    workers: 1\n")
    port = free_port()
    serve = Proc("run_all", [
        str(clone / "scripts" / "run_all.sh"), "-f", "my.yaml", "--port", str(port),
        "--Backend.greeting=Hi", "--Backend.sleep_time=0",
        f"--Broker.frontend=tcp://127.0.0.1:{free_port()}",
        f"--Broker.backend=tcp://127.0.0.1:{free_port()}"], tmp_path, cwd=project, env=env)
    try:
        def announced() -> bool:
            assert serve.alive, f"run_all.sh exited early:\n{serve.output()}"
            return "\nTry:\n" in serve.output()

        wait_until(announced, 120, "run_all.sh to serve")
        reply = http("POST", f"http://127.0.0.1:{port}/generate", b'{"text": "sun,moon"}')
        assert reply is not None and (reply.status, reply.body) == (200, b"Hi sun!\nHi moon!\n")
        assert reply.headers["x-worker-id"] == "Backend-1"  # my.yaml: 1, config.yaml: 2
    finally:
        code = serve.stop(20)
    output = serve.output()
    assert code == 0, output
    assert "Traceback" not in output, output
