"""Reading the configuration, once per process, for every zroute command.

Precedence: built-in defaults < YAML file (``-f config.yaml``) < command-line overrides
``--Section.key=value`` (nested keys allowed: ``--Backend.ServiceArgs.workers=3``).

The keys, their types, defaults and bounds are the settings classes' (zroute/settings.py);
`build` reads a mapping into any such class, a dataclass whose fields are settings or
sections of their own, and says in one line what is wrong with a value.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml

from zroute.settings import Config, Rules, key_of, rules_of

T = TypeVar("T")


class ConfigError(Exception):
    """Bad config file, key or value; str() is one line naming the culprit."""


class EndpointClash(ConfigError):
    """Broker.frontend and Broker.backend are one endpoint."""


KINDS = {str: "a string", int: "an integer", float: "a number",
         tuple[str, ...]: "a list of strings", bool: "true or false"}


@dataclass(frozen=True)
class Leaf:
    """A key that holds a value: the field's name and type, and its rules."""

    name: str
    type: Any
    rules: Rules

    def accepts(self, value: Any) -> bool:
        """True if ``value`` has the right type and lies in range."""
        if self.type == tuple[str, ...]:
            return isinstance(value, list) and all(isinstance(item, str) for item in value)
        if self.type is bool:
            return isinstance(value, bool)
        allowed = (int, float) if self.type is float else (self.type,)
        if isinstance(value, bool) or not isinstance(value, allowed):
            return False
        ge, gt, le = self.rules.ge, self.rules.gt, self.rules.le
        return ((ge is None or value >= ge) and (gt is None or value > gt)
                and (le is None or value <= le))

    def describe(self) -> str:
        """What a valid value looks like, e.g. 'must be an integer from 1 to 65535'."""
        kind, rules = KINDS[self.type], self.rules
        if rules.ge is not None and rules.le is not None:
            return f"must be {kind} from {rules.ge} to {rules.le}"
        if rules.ge is not None:
            return f"must be {kind} >= {rules.ge}"
        if rules.gt is not None:
            return f"must be {kind} > {rules.gt}"
        return f"must be {kind}"


@dataclass(frozen=True)
class Nested:
    """A key that holds a section: the field's name and the section's class."""

    name: str
    cls: type


@functools.cache
def keys_of(cls: type) -> dict[str, Leaf | Nested]:
    """The YAML keys of a settings class, in order."""
    types = typing.get_type_hints(cls)
    keys: dict[str, Leaf | Nested] = {}
    for field in dataclasses.fields(cls):
        kind = types[field.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            keys[key_of(field)] = Nested(field.name, kind)
        elif kind in KINDS:
            keys[key_of(field)] = Leaf(field.name, kind, rules_of(field))
        else:
            raise TypeError(f"{cls.__qualname__}.{field.name}: a setting is a "
                            f"{', '.join(map(_type_name, KINDS))} or a section, not a "
                            f"{_type_name(kind)}")
    return keys


def _type_name(kind: Any) -> str:
    """'int', 'tuple[str, ...]'."""
    return str(kind) if typing.get_args(kind) else kind.__name__


def _lookup(cls: type, key: Any, prefix: str) -> Leaf | Nested:
    """What ``key`` holds in ``cls``, or ConfigError naming the closest valid name, then
    all."""
    keys = keys_of(cls)
    if isinstance(key, str) and key in keys:
        return keys[key]
    close = closest(str(key), keys)
    hint = f"did you mean {prefix}{close}? " if close else ""
    if not prefix:
        raise ConfigError(f"unknown section {str(key)!r} ({hint}valid sections: {', '.join(keys)})")
    raise ConfigError(f"unknown key {prefix + str(key)!r} ({hint}valid keys: {', '.join(keys)})")


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to a mistyped `word`, whatever its case; None if none is close."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), by_lower, n=1, cutoff=0.75)
    return by_lower[close[0]] if close else None


def closest_key(dotted: str) -> str | None:
    """The configuration key closest to a mistyped one ('backend.greting' ->
    'Backend.greeting'), or None."""
    keys, found = keys_of(Config), []
    spec: Leaf | Nested | None = None
    for part in dotted.split("."):
        key = closest(part, keys)
        if key is None:
            return None
        found.append(key)
        spec = keys[key]
        keys = {} if isinstance(spec, Leaf) else keys_of(spec.cls)  # a value has no keys
    return ".".join(found) if isinstance(spec, Leaf) else None


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_value(dotted: str, value: Any, leaf: Leaf, typed: str | None = None) -> Any:
    """The value to use for `dotted`, or ConfigError; `typed` is how the user wrote it."""
    is_list = leaf.type == tuple[str, ...]
    if is_list and isinstance(value, str):
        value = [value]
    # YAML 1.1 reads 1e-1 (no dot) as a string: a number all the same.
    if leaf.type is float and isinstance(value, str) and NUMBER.fullmatch(value):
        value = float(value)
    if not leaf.accepts(value):
        shown = typed if typed is not None and NUMBER.fullmatch(typed) else repr(
            value if typed is None else typed)
        raise ConfigError(f"{dotted}: {shown} is invalid: {leaf.describe()}")
    if leaf.type is float:
        value = float(value)
    elif is_list:
        value = tuple(value)
    problem = leaf.rules.check and leaf.rules.check(value)
    if problem:  # a list's names its entry, "[1]: ...", which follows the key
        raise ConfigError(f"{dotted}{'' if problem.startswith('[') else ': '}{problem}")
    return leaf.rules.clean(value) if leaf.rules.clean else value


def _check_tree(cls: type, data: Any, prefix: str = "") -> dict[str, Any]:
    """Validate one (possibly null) mapping from the file; ``prefix`` is e.g. 'Backend.'."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        keys = ", ".join(keys_of(cls))
        raise ConfigError(f"{prefix[:-1]}: {data!r} is invalid: must be a mapping with keys {keys}")
    checked: dict[str, Any] = {}
    for key, value in data.items():
        spec = _lookup(cls, key, prefix)
        if isinstance(spec, Leaf):
            checked[key] = _check_value(f"{prefix}{key}", value, spec)
        else:
            checked[key] = _check_tree(spec.cls, value, f"{prefix}{key}.")
    return checked


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error, not the
    last one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue  # PyYAML's own check names it
            if key in first_lines:
                raise ConfigError(f"config file {self.name!r}, line {line}: the key {key!r} "
                                  f"is given twice (first on line {first_lines[key]}): "
                                  "keep one")
            first_lines[key] = line
        return super().construct_mapping(node, deep)


def _read_file(path: str) -> Any:
    try:
        with open(path, "rb") as stream:
            loader = _UniqueKeyLoader(stream)  # its name, in messages, is the path
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        detail = f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark and problem else exc
        raise ConfigError(" ".join(f"config file {path!r} is not valid YAML: {detail}".split())) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: top level must be a mapping of sections "
                          f"({', '.join(keys_of(Config))}), not a {type(data).__name__}")
    return data


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _apply_override(cls: type, values: dict[str, Any], override: str) -> None:
    """Validate one ``Section.key=value`` string and store it into ``values``."""
    dotted, has_value, raw = override.partition("=")
    if not has_value:
        raise ConfigError(f"override {override!r} has no value: the form is --Section.key=value")
    *sections, last = dotted.split(".")
    node, prefix = values, ""
    for key in sections:
        spec = _lookup(cls, key, prefix)
        if isinstance(spec, Leaf):
            raise ConfigError(f"unknown key {dotted!r} ({prefix}{key} is a value, not a section)")
        cls, node, prefix = spec.cls, node.setdefault(key, {}), f"{prefix}{key}."
    leaf = _lookup(cls, last, prefix)
    if not isinstance(leaf, Leaf):
        keys = ", ".join(keys_of(leaf.cls))
        raise ConfigError(f"{dotted} is a section, not a key: "
                          f"use --{dotted}.KEY=value with KEY one of {keys}")
    node[last] = _check_value(dotted, raw if leaf.type is str else _parse_scalar(raw), leaf, raw)


def _instantiate(cls: type, values: Mapping[str, Any]) -> Any:
    """Build ``cls`` from checked values (YAML spelling); absent keys keep their defaults."""
    kwargs = {}
    for key, spec in keys_of(cls).items():
        if key in values:
            value = values[key]
            kwargs[spec.name] = value if isinstance(spec, Leaf) else _instantiate(spec.cls, value)
    return cls(**kwargs)


def build(cls: type[T], data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> T:
    """An instance of the settings class `cls` from `data` (a mapping as YAML reads it,
    or None for the defaults), then ``Key.key=value`` overrides; raises ConfigError."""
    values = _check_tree(cls, data)
    for override in overrides:
        _apply_override(cls, values, override)
    return _instantiate(cls, values)


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults < YAML file at ``path`` < ``Section.key=value`` overrides; raises ConfigError."""
    config = build(Config, _read_file(path) if path is not None else None, overrides)
    clash = config.broker.endpoint_clash()
    if clash:
        raise EndpointClash(clash)
    for problem in (config.frontend.admin_clash(), config.broker.brokers_problem()):
        if problem:
            raise ConfigError(problem)
    return config


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv into (other args, ``Section.key=value`` overrides without the leading ``--``).

    Scanning stops at a bare ``--``; it and everything after it go to the other args,
    and so does an override without a value, for the parser to refuse.
    """
    rest: list[str] = []
    overrides: list[str] = []
    for index, arg in enumerate(argv):
        if arg == "--":
            rest.extend(argv[index:])
            break
        name = arg[2:]
        if arg.startswith("--") and name[:1].isupper() and "." in name.partition("=")[0] \
                and "=" in name:
            overrides.append(name)
        else:
            rest.append(arg)
    return rest, overrides
