"""One schema and one loader for every zroute command.

Precedence: built-in defaults < YAML file (``-f config.yaml``) < command-line overrides
``--Section.key=value`` (nested keys allowed: ``--Backend.ServiceArgs.workers=3``).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import yaml

from zroute.endpoints import endpoint_problem
from zroute.protocol import MAX_BATCH_BYTES
from zroute.ports import same_listener, tcp_address


class ConfigError(Exception):
    """Bad config file, key or value; str() is one line naming the culprit."""


class EndpointClash(ConfigError):
    """Broker.frontend and Broker.backend are one endpoint."""


@dataclass(frozen=True)
class Setting:
    """One schema leaf: value type, default and allowed range (ge/gt/le bounds).

    A `tuple` setting is a list of strings in YAML (a lone string is a list of one).
    `check`, if given, returns what is wrong with a value of the right type, or None;
    `clean`, if given, turns an accepted value into the one to use.
    """

    type: type
    default: Any
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    check: Callable[[Any], str | None] | None = None
    clean: Callable[[Any], Any] | None = None

    def accepts(self, value: Any) -> bool:
        """True if ``value`` has the right type and lies in range."""
        if self.type is tuple:
            return isinstance(value, list) and all(isinstance(item, str) for item in value)
        if self.type is bool:
            return isinstance(value, bool)
        allowed = (int, float) if self.type is float else (self.type,)
        if isinstance(value, bool) or not isinstance(value, allowed):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le))

    def describe(self) -> str:
        """What a valid value looks like, e.g. 'must be an integer from 1 to 65535'."""
        kind = {str: "a string", int: "an integer", float: "a number",
                tuple: "a list of strings", bool: "true or false"}[self.type]
        if self.ge is not None and self.le is not None:
            return f"must be {kind} from {self.ge} to {self.le}"
        if self.ge is not None:
            return f"must be {kind} >= {self.ge}"
        if self.gt is not None:
            return f"must be {kind} > {self.gt}"
        return f"must be {kind}"


def policy_spec_problem(specs: tuple[str, ...]) -> str | None:
    """Broker.policies names classes: a bare name would be a built-in policy, always valid."""
    for spec in specs:
        module, _, attribute = spec.rpartition(":")
        if not module or not attribute:
            return (f"{spec!r} is not a policy class: name one as module:Class or "
                    "path/to/file.py:Class (the built-in policies need no entry)")
    return None


# Section -> key -> Setting, or -> nested mapping of the same shape. Add a key with one line.
SCHEMA: dict[str, Any] = {
    "Backend": {
        "greeting": Setting(str, "Hello"),
        "sleep_time": Setting(float, 1.0, ge=0),
        "drain_timeout": Setting(float, 30.0, ge=0),  # SIGTERM: finish in-flight work for this long
        # Send a handler's exception text to clients; else they get a request id to look up.
        "expose_errors": Setting(bool, False),
        "ServiceArgs": {
            "workers": Setting(int, 1, ge=1),
            "capacity": Setting(int, 0, ge=0),  # 0 means unlimited
        },
    },
    "Frontend": {
        "routing_mode": Setting(str, "round_robin"),  # validated by the router
        # "[::1]" as in a URL is "::1".
        "host": Setting(str, "127.0.0.1", clean=lambda host: host.removeprefix("[").removesuffix("]")),
        "port": Setting(int, 8000, ge=1, le=65535),
        "max_body": Setting(int, 1048576, ge=1),
        "request_timeout": Setting(float, 60.0, gt=0),
        "drain_timeout": Setting(float, 30.0, ge=0),  # SIGTERM: finish streams, then cut them
        # What one HTTP peer may cost the gateway, in time, connections and bytes.
        "header_timeout": Setting(float, 10.0, gt=0),  # a request head, from its first byte
        "body_timeout": Setting(float, 30.0, gt=0),  # a request body, from its head
        "keepalive_timeout": Setting(float, 15.0, gt=0),  # an idle connection
        "send_timeout": Setting(float, 30.0, gt=0),  # a client reading none of its reply
        "max_connections": Setting(int, 0, ge=0),  # 0: from the open-file limit
        "max_buffered_bytes": Setting(int, 32 << 20, ge=1),  # request bodies at once
        "max_reply_buffer": Setting(int, 256 << 10, ge=1),  # per stream, ahead of its client
        "max_queued_messages": Setting(int, 1000, ge=1),  # from the broker, not yet handled
        "ServiceArgs": {"workers": Setting(int, 1, ge=1)},
    },
    "Broker": {
        "frontend": Setting(str, "tcp://127.0.0.1:5555", check=endpoint_problem),
        "backend": Setting(str, "tcp://127.0.0.1:5556", check=endpoint_problem),
        "heartbeat_interval": Setting(float, 1.0, gt=0),
        "heartbeat_misses": Setting(int, 3, ge=1),
        "max_retries": Setting(int, 2, ge=0),
        "request_timeout": Setting(float, 60.0, gt=0),
        "max_queue": Setting(int, 1000, ge=0),
        "queue_timeout": Setting(float, 5.0, ge=0),
        "max_queue_per_client": Setting(int, 250, ge=0),  # of all the queues, per client
        "max_requests_per_client": Setting(int, 10_000, ge=1),  # held by the broker, per client
        # Bytes the broker holds: one request's body; a client's bodies and unread
        # replies; everyone's.
        "max_request_bytes": Setting(int, 1 << 20, ge=1),
        "max_client_bytes": Setting(int, 128 << 20, ge=1),
        "max_buffered_bytes": Setting(int, 256 << 20, ge=1),
        # Peers pack messages into frames of up to MAX_BATCH_BYTES.
        "max_message_size": Setting(int, 8388608, ge=MAX_BATCH_BYTES),
        "max_workers": Setting(int, 1000, ge=1),  # live workers; a READY past it is refused
        "max_services_per_worker": Setting(int, 64, ge=1),  # names one READY may declare
        "max_departed_workers": Setting(int, 100, ge=0),  # evicted workers kept in stats
        "stats_max_workers": Setting(int, 100, ge=1),  # workers listed in one stats reply
        "stats_interval": Setting(float, 0.1, ge=0),  # STATS past a client's share wait this long at most
        # Policy classes (module:Class) a request may name besides the built-in ones.
        "policies": Setting(tuple, (), check=policy_spec_problem),
    },
}


def _attr_name(key: str) -> str:
    """YAML key -> attribute name: 'ServiceArgs' -> 'service_args', 'Backend' -> 'backend'."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()


class _Node:
    """Base of the frozen dataclasses generated from SCHEMA."""

    if TYPE_CHECKING:  # attributes are generated, so let type checkers accept any of them
        def __getattr__(self, name: str) -> Any: ...

    def as_dict(self) -> dict[str, Any]:
        """Nested plain dict with the YAML spelling of keys."""
        result: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            result[field.metadata["key"]] = value.as_dict() if isinstance(value, _Node) else value
        return result


class Config(_Node):
    """Effective configuration: ``cfg.backend.greeting``, ``cfg.frontend.service_args.workers``..."""


def _make_class(name: str, schema: Mapping[str, Any], base: type) -> type:
    """Generate a frozen dataclass (defaults included) mirroring one level of the schema."""
    fields: list[tuple[str, Any, Any]] = []
    for key, spec in schema.items():
        meta = {"key": key}
        if isinstance(spec, Setting):
            field = dataclasses.field(default=spec.default, metadata=meta)
            fields.append((_attr_name(key), spec.type, field))
        else:
            sub = _make_class(key, spec, _Node)
            fields.append((_attr_name(key), sub, dataclasses.field(default_factory=sub, metadata=meta)))
    cls = dataclasses.make_dataclass(name, fields, bases=(base,), frozen=True)
    cls.__module__ = __name__
    return cls


_ConfigClass = _make_class("Config", SCHEMA, Config)


def _lookup(schema: Mapping[str, Any], key: Any, prefix: str) -> Any:
    """Schema entry for ``key``, or ConfigError naming the closest valid name, then all."""
    if isinstance(key, str) and key in schema:
        return schema[key]
    close = closest(str(key), schema)
    hint = f"did you mean {prefix}{close}? " if close else ""
    if not prefix:
        raise ConfigError(f"unknown section {str(key)!r} ({hint}valid sections: {', '.join(schema)})")
    raise ConfigError(f"unknown key {prefix + str(key)!r} ({hint}valid keys: {', '.join(schema)})")


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to a mistyped `word`, whatever its case; None if none is close."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), by_lower, n=1, cutoff=0.75)
    return by_lower[close[0]] if close else None


def closest_key(dotted: str) -> str | None:
    """The configuration key closest to a mistyped one ('backend.greting' ->
    'Backend.greeting'), or None."""
    schema: Any = SCHEMA
    found = []
    for part in dotted.split("."):
        key = closest(part, schema) if isinstance(schema, Mapping) else None
        if key is None:
            return None
        found.append(key)
        schema = schema[key]
    return ".".join(found) if isinstance(schema, Setting) else None


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_value(dotted: str, value: Any, setting: Setting, typed: str | None = None) -> Any:
    """The value to use for `dotted`, or ConfigError; `typed` is how the user wrote it."""
    if setting.type is tuple and isinstance(value, str):
        value = [value]
    # YAML 1.1 reads 1e-1 (no dot) as a string: a number all the same.
    if setting.type is float and isinstance(value, str) and NUMBER.fullmatch(value):
        value = float(value)
    if not setting.accepts(value):
        shown = typed if typed is not None and NUMBER.fullmatch(typed) else repr(
            value if typed is None else typed)
        raise ConfigError(f"{dotted}: {shown} is invalid: {setting.describe()}")
    if setting.type is float:
        value = float(value)
    elif setting.type is tuple:
        value = tuple(value)
    problem = setting.check and setting.check(value)
    if problem:
        raise ConfigError(f"{dotted}: {problem}")
    return setting.clean(value) if setting.clean else value


def _check_tree(schema: Mapping[str, Any], data: Any, prefix: str = "") -> dict[str, Any]:
    """Validate one (possibly null) mapping from the file; ``prefix`` is e.g. 'Backend.'."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        keys = ", ".join(schema)
        raise ConfigError(f"{prefix[:-1]}: {data!r} is invalid: must be a mapping with keys {keys}")
    checked: dict[str, Any] = {}
    for key, value in data.items():
        spec = _lookup(schema, key, prefix)
        if isinstance(spec, Setting):
            checked[key] = _check_value(f"{prefix}{key}", value, spec)
        else:
            checked[key] = _check_tree(spec, value, f"{prefix}{key}.")
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
                          f"({', '.join(SCHEMA)}), not a {type(data).__name__}")
    return data


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _apply_override(values: dict[str, Any], override: str) -> None:
    """Validate one ``Section.key=value`` string and store it into ``values``."""
    dotted, has_value, raw = override.partition("=")
    if not has_value:
        raise ConfigError(f"override {override!r} has no value: the form is --Section.key=value")
    *sections, leaf = dotted.split(".")
    schema, node, prefix = SCHEMA, values, ""
    for key in sections:
        spec = _lookup(schema, key, prefix)
        if isinstance(spec, Setting):
            raise ConfigError(f"unknown key {dotted!r} ({prefix}{key} is a value, not a section)")
        schema, node, prefix = spec, node.setdefault(key, {}), f"{prefix}{key}."
    spec = _lookup(schema, leaf, prefix)
    if not isinstance(spec, Setting):
        keys = ", ".join(spec)
        raise ConfigError(f"{dotted} is a section, not a key: "
                          f"use --{dotted}.KEY=value with KEY one of {keys}")
    node[leaf] = _check_value(dotted, raw if spec.type is str else _parse_scalar(raw), spec, raw)


def _instantiate(cls: type, values: Mapping[str, Any]) -> Any:
    """Build ``cls`` from checked values (YAML spelling); absent keys keep their defaults."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.metadata["key"] in values:
            value = values[field.metadata["key"]]
            is_node = dataclasses.is_dataclass(field.type)
            kwargs[field.name] = _instantiate(field.type, value) if is_node else value
    return cls(**kwargs)


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults < YAML file at ``path`` < ``Section.key=value`` overrides; raises ConfigError."""
    values = _check_tree(SCHEMA, _read_file(path) if path is not None else None)
    for override in overrides:
        _apply_override(values, override)
    config = _instantiate(_ConfigClass, values)
    _check_endpoints_differ(config.broker.frontend, config.broker.backend)
    return config


def _check_endpoints_differ(frontend: str, backend: str) -> None:
    """Clients and workers speak different protocols: each needs its own socket."""
    if frontend == backend or _same_tcp_port(frontend, backend):
        broker = SCHEMA["Broker"]
        raise EndpointClash(f"Broker.frontend ({frontend}) and Broker.backend ({backend}) are "
                            "the same endpoint: clients connect to Broker.frontend and workers "
                            "to Broker.backend, so each needs its own (by default "
                            f"{broker['frontend'].default} and {broker['backend'].default})")


def _same_tcp_port(first: str, second: str) -> bool:
    """Both tcp, on one port of one host (or of every host)."""
    addresses = tcp_address(first), tcp_address(second)
    return None not in addresses and same_listener(*addresses)


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
