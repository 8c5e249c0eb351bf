"""One schema and one loader for every zroute command.

Precedence: built-in defaults < YAML file (``-f config.yaml``) < command-line overrides
``--Section.key=value`` (nested keys allowed: ``--Backend.ServiceArgs.workers=3``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import yaml

from broker.protocol import MAX_BATCH_BYTES


class ConfigError(Exception):
    """Bad config file, key or value; str() is one line naming the culprit."""


@dataclass(frozen=True)
class Setting:
    """One schema leaf: value type, default and allowed range (ge/gt/le bounds).

    A `tuple` setting is a list of strings in YAML (a lone string is a list of one).
    `check`, if given, returns what is wrong with a value of the right type, or None.
    """

    type: type
    default: Any
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    check: Callable[[Any], str | None] | None = None

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


ENDPOINT_SCHEMES = ("tcp", "ipc", "inproc")


def endpoint_problem(value: str) -> str | None:
    """What is wrong with a ZeroMQ endpoint, and what would be right; None if nothing."""
    scheme, has_scheme, address = value.partition("://")
    if not has_scheme:
        example = f"tcp://{value}" if re.fullmatch(r"[\w.\-*]+:\d+", value) else "tcp://127.0.0.1:5555"
        return (f"{value!r} is not a ZeroMQ endpoint: use tcp://HOST:PORT "
                f"(e.g. {example}) or ipc:///path")
    if scheme not in ENDPOINT_SCHEMES:
        return (f"{value!r} has the scheme {scheme!r}: ZeroMQ endpoints here are "
                "tcp://HOST:PORT, ipc:///path or inproc://name")
    if not address:
        return f"{value!r} names no address after {scheme}://"
    if scheme != "tcp":
        return None
    host, has_port, port = address.rpartition(":")
    if not has_port or not port:
        return f"{value!r} has no port: use tcp://HOST:PORT, e.g. tcp://{address}:5555"
    if not host:
        return f"{value!r} has no host: use tcp://HOST:PORT, e.g. tcp://127.0.0.1{address}"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{value!r} has the port {port!r}: a port is a number from 1 to 65535"
    return None


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
        "host": Setting(str, "127.0.0.1"),
        "port": Setting(int, 8000, ge=1, le=65535),
        "max_body": Setting(int, 1048576, ge=1),
        "request_timeout": Setting(float, 60.0, gt=0),
        "drain_timeout": Setting(float, 30.0, ge=0),  # SIGTERM: finish streams, then cut them
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
    """Schema entry for ``key``, or ConfigError listing the valid names."""
    if isinstance(key, str) and key in schema:
        return schema[key]
    if not prefix:
        raise ConfigError(f"unknown section {str(key)!r} (valid sections: {', '.join(schema)})")
    raise ConfigError(f"unknown key {prefix + str(key)!r} (valid keys: {', '.join(schema)})")


def _check_value(dotted: str, value: Any, setting: Setting) -> Any:
    if setting.type is tuple and isinstance(value, str):
        value = [value]
    if not setting.accepts(value):
        raise ConfigError(f"{dotted}: {value!r} is invalid: {setting.describe()}")
    if setting.type is float:
        value = float(value)
    elif setting.type is tuple:
        value = tuple(value)
    problem = setting.check and setting.check(value)
    if problem:
        raise ConfigError(f"{dotted}: {problem}")
    return value


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


def _read_file(path: str) -> Any:
    try:
        with open(path, "rb") as stream:
            data = yaml.safe_load(stream)
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
    node[leaf] = _check_value(dotted, raw if spec.type is str else _parse_scalar(raw), spec)


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
        raise ConfigError(f"Broker.frontend ({frontend}) and Broker.backend ({backend}) are the "
                          "same endpoint: clients connect to Broker.frontend and workers to "
                          "Broker.backend, so each needs its own (by default "
                          f"{broker['frontend'].default} and {broker['backend'].default})")


def _same_tcp_port(first: str, second: str) -> bool:
    """Both tcp, on one port of one host (or of every host, "*")."""
    if not (first.startswith("tcp://") and second.startswith("tcp://")):
        return False
    (host1, _, port1), (host2, _, port2) = (
        endpoint[len("tcp://"):].replace("localhost", "127.0.0.1").rpartition(":")
        for endpoint in (first, second))
    return port1 == port2 and (host1 == host2 or "*" in (host1, host2))


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv into (other args, ``Section.key=value`` overrides without the leading ``--``).

    Scanning stops at a bare ``--``; it and everything after it go to the other args.
    """
    rest: list[str] = []
    overrides: list[str] = []
    for index, arg in enumerate(argv):
        if arg == "--":
            rest.extend(argv[index:])
            break
        name = arg[2:]
        if arg.startswith("--") and name[:1].isupper() and "." in name.partition("=")[0]:
            if "=" not in name:
                raise ConfigError(f"override {arg!r} has no value: the form is --Section.key=value")
            overrides.append(name)
        else:
            rest.append(arg)
    return rest, overrides
