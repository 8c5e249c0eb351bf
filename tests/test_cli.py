"""The `zroute` command's own options."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from tests.support import run_zroute


@pytest.mark.timeout(20)
def test_version_prints_the_package_version():
    result = run_zroute("--version")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"zroute {version('zroute')}\n", "")
