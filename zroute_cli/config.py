"""Reading the configuration, once per process, for every zroute command.

Precedence: built-in defaults < YAML file (``-f config.yaml``) < command-line overrides
``--Section.key=value`` (nested keys allowed: ``--Backend.ServiceArgs.workers=3``).

The keys, their types, defaults and bounds are the settings classes' (zroute/settings.py);
`build` reads a mapping into any such class, a dataclass whose fields are settings or
sections of their own, and says in one line what is wrong with a value.

The sections are those of a service graph (zroute/services.py): one per service, named by
its class, with the keys the class declares and those of the process that runs it
(WorkerSettings' for a service of workers, CallingWorkerSettings' if it has dependencies,
FrontendSettings' for one the gateway serves),
and Broker. `config_class(graph)` makes that class; without a graph, the built-in one's
(Backend, Frontend, Broker).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml

from zroute.services import Graph, Service, walk
from zroute.settings import (BrokerSettings, CallingWorkerSettings, Config, FrontendSettings,
                             GatewayChecks, Rules, Section, WorkerSettings, key_of, rules_of,
                             section, setting)

T = TypeVar("T")


class ConfigError(Exception):
    """Bad config file, key or value; str() is one line naming the culprit."""


class EndpointClash(ConfigError):
    """Broker.frontend and Broker.backend are one endpoint."""


SCALARS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
LISTS = {tuple[str, ...]: tuple, list[str]: list}  # each kind, and what makes its value
KINDS = {**SCALARS, **dict.fromkeys(LISTS, "a list of strings")}


def leaf_kind(kind: Any) -> tuple[Any, bool] | None:
    """The kind of a setting's type and whether null is a value of it (`X | None`,
    `Optional[X]`, for a scalar X); None if no setting can have the type."""
    if kind in KINDS:
        return kind, False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        scalars = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(scalars) == 1 and len(typing.get_args(kind)) == 2 and scalars[0] in SCALARS:
            return scalars[0], True
    return None


@dataclass(frozen=True)
class Leaf:
    """A key that holds a value: the field's name and kind, and its rules."""

    name: str
    type: Any  # a kind of KINDS
    rules: Rules
    required: bool = False  # no default: the file or an override must give it
    optional: bool = False  # null is a value: None

    def accepts(self, value: Any) -> bool:
        """True if ``value`` has the right type and lies in range."""
        if value is None:
            return self.optional
        if self.type in LISTS:
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
        kind, rules = KINDS[self.type] + (" or null" if self.optional else ""), self.rules
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
        elif leaf_kind(kind):
            base, optional = leaf_kind(kind)
            keys[key_of(field)] = Leaf(field.name, base, rules_of(field),
                                       _is_required(field), optional)
        else:
            raise TypeError(kind_problem(f"{cls.__qualname__}.{field.name}", kind))
    return keys


def kind_problem(dotted: str, kind: Any) -> str:
    """Why a setting cannot have the type `kind`."""
    return (f"{dotted}: a setting is a {', '.join(map(_type_name, SCALARS))} (each may be "
            f"`X | None`), {' or '.join(map(_type_name, LISTS))}, or a section, not a "
            f"{_type_name(kind)}")


def _is_required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _type_name(kind: Any) -> str:
    """'int', 'tuple[str, ...]', 'str | None'."""
    if typing.get_origin(kind) is typing.Union:  # Optional[str]: as `str | None` shows
        return " | ".join(_type_name(arg) for arg in typing.get_args(kind))
    if kind is type(None):
        return "None"
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


def closest_key(dotted: str, cls: type | None = None) -> str | None:
    """The key of the configuration class `cls` (the built-in graph's by default) closest
    to a mistyped one ('backend.greting' -> 'Backend.greeting'), or None."""
    keys, found = keys_of(cls or builtin_config_class()), []
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
    if value is None and leaf.optional:
        return None
    is_list = leaf.type in LISTS
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
        value = LISTS[leaf.type](value)
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


def _read_file(path: str, cls: type) -> Any:
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
                          f"({', '.join(keys_of(cls))}), not a {type(data).__name__}")
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
    # A str is the text as it is; `null` is None for one that may be.
    as_text = leaf.type is str and not (leaf.optional and raw == "null")
    value = raw if as_text else _parse_scalar(raw)
    node[last] = _check_value(dotted, value, leaf, raw)


def _instantiate(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Build ``cls`` from checked values (YAML spelling); absent keys keep their defaults,
    and a required key that is absent is a ConfigError."""
    kwargs = {}
    for key, spec in keys_of(cls).items():
        if key in values:
            value = values[key]
            kwargs[spec.name] = (value if isinstance(spec, Leaf)
                                 else _instantiate(spec.cls, value, f"{prefix}{key}."))
        elif isinstance(spec, Leaf) and spec.required:
            raise ConfigError(f"{prefix}{key} is required and has no default: set it in the "
                              f"config file or with --{prefix}{key}=VALUE")
        elif isinstance(spec, Nested):
            kwargs[spec.name] = _instantiate(spec.cls, {}, f"{prefix}{key}.")
    return cls(**kwargs)


def build(cls: type[T], data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> T:
    """An instance of the settings class `cls` from `data` (a mapping as YAML reads it,
    or None for the defaults), then ``Key.key=value`` overrides; raises ConfigError."""
    values = _check_tree(cls, data)
    for override in overrides:
        _apply_override(cls, values, override)
    return _instantiate(cls, values)


def load_config(path: str | None = None, overrides: Sequence[str] = (),
                graph: Graph | None = None) -> Config:
    """The configuration of `graph` (the built-in one's by default): defaults < YAML file
    at ``path`` < ``Section.key=value`` overrides; raises ConfigError."""
    cls = builtin_config_class() if graph is None else config_class(graph)
    config = build(cls, _read_file(path, cls) if path is not None else None, overrides)
    clash = config.broker.endpoint_clash()
    if clash:
        raise EndpointClash(clash)
    gateways = [settings for settings in sections(config).values()
                if isinstance(settings, GatewayChecks)]
    problems = [*(settings.admin_clash() for settings in gateways),
                config.broker.brokers_problem()]
    for problem in problems:
        if problem:
            raise ConfigError(problem)
    return config


# --- the sections of a service graph ----------------------------------------------------


def field_name(service_name: str) -> str:
    """The attribute of a service's section on the configuration: `config.backend`."""
    return service_name.lower()


def sections(config: Config) -> dict[str, Any]:
    """The services' sections of a configuration, by service name."""
    return {key_of(field): getattr(config, field.name) for field in dataclasses.fields(config)
            if field.name != "broker"}


def section_of(config: Config, described: Service) -> Any:
    return getattr(config, field_name(described.name))


def config_class(graph: Graph) -> type[Config]:
    """The configuration class of a graph; ConfigError if a service's settings cannot be
    keys."""
    return _config_class(graph.root.cls)


@functools.cache
def _config_class(root: type) -> type[Config]:
    graph = walk(root)
    fields = [(field_name(s.name), cls, section(cls, s.name))
              for s in graph.services for cls in [section_class(s)]]
    fields.append(("broker", BrokerSettings, section(BrokerSettings, "Broker")))
    return dataclasses.make_dataclass("Config", fields, bases=(Config,), frozen=True,
                                      kw_only=True)


def builtin_config_class() -> type[Config]:
    """The built-in graph's configuration class: Backend, Frontend, Broker."""
    return config_class(builtin_graph())


def builtin_graph() -> Graph:
    from worker.greeting import Frontend  # the built-in graph; loaded when it is needed

    return walk(Frontend)


def section_class(described: Service) -> type:
    """The class of a service's section: the keys the service declares, then the runtime
    settings of the process that runs it (a declared key may set a runtime one of the same
    name and type, as the built-in Frontend's routing_mode does), with ServiceArgs.workers
    defaulting to @service(workers=...)."""
    runtime = runtime_settings(described)
    runtime_types = typing.get_type_hints(runtime)
    fields: dict[str, tuple[str, Any, dataclasses.Field]] = {}
    for declared in described.settings:
        dotted = f"{described.name}.{declared.name}"
        if leaf_kind(declared.type) is None:
            raise ConfigError(kind_problem(dotted, declared.type))
        runtime_type = runtime_types.get(declared.name, declared.type)
        if runtime_type != declared.type:
            raise ConfigError(f"{dotted}: declared as {_type_name(declared.type)}, but it is "
                              f"the {_type_name(runtime_type)} setting of the process that "
                              "runs the service: rename it")
        fields[declared.name] = (declared.name, declared.type, _field(declared.default))
    for runtime_field in dataclasses.fields(runtime):
        name = runtime_field.name
        if name in fields:  # declared by the service: its default, the runtime's rules
            _, kind, declared_field = fields[name]
            fields[name] = (name, kind, dataclasses.field(
                default=declared_field.default, metadata=runtime_field.metadata))
        else:
            fields[name] = (name, runtime_types[name], _field(runtime_field))
    args = dataclasses.make_dataclass(
        "ServiceArgs", [("workers", int, setting(described.workers, ge=1))],
        bases=(runtime.ServiceArgs,), frozen=True, kw_only=True)
    fields["service_args"] = ("service_args", args, section(args, "ServiceArgs"))
    bases = (GatewayChecks, Section) if described.is_http else (Section,)
    try:
        return dataclasses.make_dataclass(described.name, list(fields.values()), bases=bases,
                                          frozen=True, kw_only=True)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{described.name}: its settings cannot be read: {e}") from None


def runtime_settings(described: Service) -> type:
    """The settings of the process that runs a service: a gateway's, or a worker's (with
    the routing_mode of its calls if it makes any)."""
    if described.is_http:
        return FrontendSettings
    return CallingWorkerSettings if described.dependencies else WorkerSettings


def _field(default: Any) -> dataclasses.Field:
    """A field of a section class from a default, or from a field (`setting(...)`, with its
    rules, or a runtime setting's)."""
    if isinstance(default, list):  # each section its own list
        return dataclasses.field(default_factory=functools.partial(list, default))
    if not isinstance(default, dataclasses.Field):
        return dataclasses.field(default=default)
    return dataclasses.field(default=default.default, default_factory=default.default_factory,
                             metadata=default.metadata)


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
