"""scripts/soak.py with every kind of hostile peer beside its normal load, real processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO_ROOT, child_env


@pytest.mark.timeout(120)
def test_hostile_peers_of_every_kind_cost_the_normal_load_nothing():
    result = subprocess.run(
        [sys.executable, "scripts/soak.py", "--duration", "8", "--workers", "2",
         "--concurrency", "8", "--kill-every", "0", "--hostile", "all"],
        cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failures of the normal load beside hostile peers: 0" in result.stdout
    for kind in ("malformed", "oversized", "bad-ready", "stats-loop", "slow-reader", "impostor"):
        assert f"hostile {kind}" in result.stdout
