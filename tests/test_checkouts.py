"""scripts/checkouts.py, behind the benchmarks' --compare-tree: another checkout's code runs
in processes of its own, imported from that checkout and never from this one. Real
subprocesses, and a checkout laid out as before the shared modules moved from broker/ to
zroute/."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

pytestmark = pytest.mark.timeout(30)


def checkouts():
    spec = importlib.util.spec_from_file_location("checkouts", SCRIPTS / "checkouts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def checkout_before_the_move(tmp_path: Path) -> Path:
    """The layout of a checkout before 9a5e4a9: the client in broker/, the command in
    zroute/cli.py."""
    tree = tmp_path / "before"
    for package in ("zroute", "broker"):
        (tree / package).mkdir(parents=True)
        (tree / package / "__init__.py").write_text("")
    (tree / "broker" / "client.py").write_text("")
    (tree / "zroute" / "cli.py").write_text(
        "import sys\nimport zroute\n\n\ndef main():\n"
        "    print(sys.argv, zroute.__file__)\n    return 3\n")
    (tree / "pyproject.toml").write_text('[project.scripts]\nzroute = "zroute.cli:main"\n')
    return tree


def in_a_child(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh Python, after `import checkouts`."""
    prelude = f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import checkouts\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, timeout=20)


def test_another_checkout_runs_the_zroute_command_its_pyproject_names(tmp_path):
    tree = checkout_before_the_move(tmp_path)
    compared = checkouts().Tree.at(tree)
    assert compared.label == "zroute@before"  # not a git checkout: named by its folder
    result = subprocess.run([*compared.command(), "broker", "--frontend", "tcp://x:1"],
                            capture_output=True, text=True, timeout=20)
    assert (result.returncode, result.stdout, result.stderr) == (
        3, f"['zroute', 'broker', '--frontend', 'tcp://x:1'] {tree / 'zroute' / '__init__.py'}\n",
        "")


def test_a_process_of_another_checkout_takes_the_client_from_that_checkout(tmp_path):
    # This checkout's editable install would find zroute/client.py here.
    tree = checkout_before_the_move(tmp_path)
    result = in_a_child(f"checkouts.import_from({str(tree)!r})\n"
                        "print(checkouts.client_module().__file__)")
    assert (result.stdout, result.stderr) == (f"{tree / 'broker' / 'client.py'}\n", "")


def test_a_process_that_has_imported_the_project_refuses_another_checkout(tmp_path):
    tree = checkout_before_the_move(tmp_path)
    result = in_a_child(f"import zroute\ncheckouts.import_from({str(tree)!r})")
    assert result.returncode == 1
    assert result.stderr.endswith(f"RuntimeError: zroute imported before the checkout {tree} "
                                  "was chosen\n"), result.stderr
