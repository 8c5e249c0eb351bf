"""Load what a user names as `module:attr` or `path/to/file.py:attr`.

Handlers, routing policies and service graphs are named this way in the configuration
and on the command line. A module is found as `python -m` finds it: in the current
directory first, then among the installed packages. (A console script such as
`zroute` starts with its own bin directory on sys.path, not the current one.) What a file
imports is found beside it too, as `python path/to/file.py` finds it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


class LoadError(Exception):
    """A spec that cannot be loaded or used; str() is one line naming the spec and why."""


def load_object(spec: str, what: str) -> Any:
    """The attribute `attr` of the module or file named by `spec` ("module:attr").

    `what` names where the spec came from (e.g. "--handler"), for the error message.
    """
    source, _, attribute = spec.rpartition(":")  # rpartition: "C:\\dir\\f.py:attr" has two
    if not source or not attribute:
        raise LoadError(f"{what} {spec!r} is invalid: use the form module:attr "
                        "or path/to/file.py:attr")
    try:
        module = _load_file(source) if _is_file(source) else _import(source)
    except LoadError as e:
        raise LoadError(f"{what} {spec!r} cannot be loaded: {e}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise LoadError(f"{what} {spec!r} cannot be loaded: "
                        f"{source!r} has no attribute {attribute!r}") from None


def _is_file(source: str) -> bool:
    return source.endswith(".py") or os.sep in source or "/" in source


def _on_path(directory: str) -> None:
    if directory not in sys.path:
        sys.path.insert(0, directory)


def _import(name: str) -> ModuleType:
    cwd = os.getcwd()
    if "" not in sys.path:
        _on_path(cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise LoadError(f"no module named {name!r} in the current directory ({cwd}) "
                            "or the installed packages") from None
        raise LoadError(f"module {name!r} imports {e.name!r}, which cannot be found") from None
    except Exception as e:
        raise LoadError(_import_failure(name, e)) from None


def _load_file(path: str) -> ModuleType:
    file = Path(path).resolve()
    if not file.is_file():
        raise LoadError(f"no file {path!r} (in {os.getcwd()})")
    name = f"_zroute_file_{file.stem}_{abs(hash(str(file))):x}"
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    # What the file imports is found as `python path/to/file.py` finds it, beside the
    # file, and as `python -m` finds modules, in the current directory.
    _on_path(os.getcwd())
    _on_path(str(file.parent))
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # classes defined in it can find their module
    try:
        module_spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        del sys.modules[name]
        raise LoadError(f"{path!r} imports {e.name!r}, which cannot be found") from None
    except Exception as e:
        del sys.modules[name]
        raise LoadError(_import_failure(path, e)) from None
    return module


def _import_failure(source: str, error: Exception) -> str:
    """One line about a module that raised while it was imported."""
    if isinstance(error, SyntaxError):
        return f"syntax error in {error.filename} line {error.lineno}: {error.msg}"
    detail = " ".join(str(error).split())
    return f"importing {source!r} raised {type(error).__name__}: {detail}"
