"""`module:attr` as a user names it: found in the current directory, or as a file; one-line errors."""

from __future__ import annotations

import itertools
import sys
import textwrap
from pathlib import Path

import pytest

from zroute.client import BlockingClient
from zroute.loader import LoadError, load_object
from tests.support import Stack, readme_example, run_zroute

_names = itertools.count()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The current directory is a user's project; write(source) makes a module in it
    and returns its (unique) name. sys.path and sys.modules are restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    written: list[str] = []

    def write(source: str, name: str | None = None) -> str:
        name = name or f"user_module_{next(_names)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def load_error(spec: str) -> str:
    with pytest.raises(LoadError) as info:
        load_object(spec, "--handler")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_module_in_the_current_directory_loads(project):
    name = project("def shout(request):\n    return 'SHOUT'\n")
    assert load_object(f"{name}:shout", "--handler")({}) == "SHOUT"


def test_a_file_path_loads(project, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "policy.py").write_text("class P:\n    pass\n")
    loaded = load_object("lib/policy.py:P", "Broker.policies")
    assert loaded.__name__ == "P"
    assert load_object(f"{tmp_path}/lib/policy.py:P", "Broker.policies") is loaded


def test_a_missing_module_is_named(project, tmp_path):
    assert load_error("no_such_module_here:f") == (
        f"--handler 'no_such_module_here:f' cannot be loaded: no module named "
        f"'no_such_module_here' in the current directory ({tmp_path}) or the installed packages")


def test_a_module_that_imports_a_missing_one_says_so(project):
    name = project("import not_installed_anywhere\n")
    assert load_error(f"{name}:f") == (
        f"--handler '{name}:f' cannot be loaded: module '{name}' imports "
        "'not_installed_anywhere', which cannot be found")


def test_a_missing_attribute_is_named(project):
    name = project("def shout(request):\n    pass\n")
    assert load_error(f"{name}:shuot") == (
        f"--handler '{name}:shuot' cannot be loaded: '{name}' has no attribute 'shuot'")


def test_a_syntax_error_names_file_and_line(project, tmp_path):
    name = project("def shout(request):\n    return (\n\nx = 1 +\n")
    message = load_error(f"{name}:shout")
    assert message.startswith(f"--handler '{name}:shout' cannot be loaded: syntax error in "
                              f"{tmp_path / name}.py line ")


def test_a_module_that_raises_on_import_says_what(project):
    name = project("raise RuntimeError('no config\\nfound')\n")
    assert load_error(f"{name}:f") == (
        f"--handler '{name}:f' cannot be loaded: importing '{name}' raised "
        "RuntimeError: no config found")


@pytest.mark.parametrize("spec", ["shout", ":shout", "module:"])
def test_a_spec_without_module_and_attribute_shows_the_form(spec):
    assert load_error(spec) == (f"--handler {spec!r} is invalid: use the form module:attr "
                                "or path/to/file.py:attr")


def test_a_missing_file_is_named(project, tmp_path):
    assert load_error("lib/nope.py:P") == (
        f"--handler 'lib/nope.py:P' cannot be loaded: no file 'lib/nope.py' (in {tmp_path})")


# --- the zroute command, as a user runs it ---------------------------------------------

SHOUT = readme_example("### Handlers")  # mymodule.py, as the README shows it


@pytest.mark.timeout(30)
def test_zroute_worker_imports_a_handler_from_the_current_directory(stack: Stack, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodule.py").write_text(SHOUT)
    stack.cwd = project
    stack.broker()
    stack.worker("w1", "--handler", "mymodule:shout")
    stack.wait_workers("w1")
    with BlockingClient(stack.frontend, timeout=10) as client:
        assert b"".join(client.request("generate", {"text": "a,b"})) == b"A\nB\n"


@pytest.mark.timeout(30)
def test_zroute_worker_with_a_handler_that_does_not_load_exits_with_one_line(tmp_path):
    (tmp_path / "mymodule.py").write_text(SHOUT)
    result = run_zroute("worker", "--handler", "mymodule:shuot", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("zroute worker: error: --handler 'mymodule:shuot' cannot be "
                             "loaded: 'mymodule' has no attribute 'shuot'\n")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("source, problem", [
    ("def shout(request):\n    yield 'a'\n", "is a generator function (def with yield)"),
    ("async def shout(request):\n    return 'a'\n", "is an async function without yield"),
    ("def shout(config):\n    def handler(request):\n        yield 'a'\n    return handler\n",
     "returned a generator function (def with yield)"),
], ids=["generator", "coroutine", "factory-of-generator"])
def test_a_handler_that_is_not_an_async_generator_is_named_before_any_request(
        tmp_path, source, problem):
    (tmp_path / "mymodule.py").write_text(source)
    result = run_zroute("worker", "--handler", "mymodule:shout", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"zroute worker: error: --handler 'mymodule:shout' {problem}: "
                             f"{HANDLER_FORMS}\n")


HANDLER_FORMS = ("a handler is an async generator function (async def with yield); "
                 "a factory takes the configuration and returns one")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("source, problem", [
    # Called with the Config, it returns its text: neither a handler nor a factory.
    ("def shout(request):\n    return 'x\\n'\n",
     "is a plain function (def without yield), and called as a factory it returned the "
     "str 'x\\n'"),
    # Called with the Config, it fails as it treats the Config as a request.
    ("def shout(request):\n    return request['text']\n",
     "is a plain function (def without yield), and called as a factory it raised "
     "TypeError: 'Config' object is not subscriptable"),
    ("shout = 'a'\n", "is the str 'a', not callable:"),
], ids=["plain-returns", "plain-raises", "not-callable"])
def test_a_plain_function_as_handler_names_both_forms(tmp_path, source, problem):
    (tmp_path / "mymodule.py").write_text(source)
    result = run_zroute("worker", "--handler", "mymodule:shout", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"zroute worker: error: --handler 'mymodule:shout' {problem}")
    assert result.stderr.endswith(f" {HANDLER_FORMS}\n")
    assert result.stderr.count("\n") == 1
