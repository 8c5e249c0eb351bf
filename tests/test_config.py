"""Tests for reading the configuration (zroute_cli/config.py): defaults < YAML file <
--Section.key=value overrides."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from zroute.settings import Config, section, setting
from zroute_cli.config import ConfigError, build, closest_key, load_config, split_overrides

DEFAULTS = {
    "Backend": {
        "greeting": "Hello",
        "sleep_time": 1.0,
        "drain_timeout": 30.0,
        "expose_errors": False,
        "curve_key": "",
        "ServiceArgs": {"workers": 1, "capacity": 0},
    },
    "Frontend": {
        "routing_mode": "round_robin",
        "host": "127.0.0.1",
        "port": 8000,
        "max_body": 1048576,
        "request_timeout": 60.0,
        "drain_timeout": 30.0,
        "header_timeout": 10.0,
        "body_timeout": 30.0,
        "keepalive_timeout": 15.0,
        "send_timeout": 30.0,
        "max_connections": 0,
        "max_buffered_bytes": 33554432,
        "max_reply_buffer": 262144,
        "max_queued_messages": 1000,
        "admin_host": "127.0.0.1",
        "admin_port": 0,
        "stats_feed_interval": 1.0,
        "max_stats_feeds": 32,
        "expose_errors": False,
        "curve_key": "",
        "tls_cert": "",
        "tls_key": "",
        "ServiceArgs": {"workers": 1},
    },
    "Broker": {
        "frontend": "tcp://127.0.0.1:5555",
        "backend": "tcp://127.0.0.1:5556",
        "heartbeat_interval": 1.0,
        "heartbeat_misses": 3,
        "max_retries": 2,
        "request_timeout": 60.0,
        "max_queue": 1000,
        "queue_timeout": 5.0,
        "max_queue_per_client": 250,
        "max_requests_per_client": 10000,
        "max_request_bytes": 1048576,
        "max_client_bytes": 134217728,
        "max_buffered_bytes": 268435456,
        "max_message_size": 8388608,
        "max_workers": 1000,
        "max_services_per_worker": 64,
        "max_departed_workers": 100,
        "stats_max_workers": 100,
        "stats_interval": 0.1,
        "policies": (),
        "curve_secret_key": "",
        "curve_public_key": "",
        "curve_workers_dir": "",
        "curve_clients_dir": "",
        "insecure": False,
        "frontends": (),
        "backends": (),
        "ServiceArgs": {"workers": 1},
    },
}

SEED = """\
Backend:
  greeting: "Goodnight"
  sleep_time: 1
  ServiceArgs:
    workers: 2
Frontend:
  routing_mode: "round_robin"
  ServiceArgs:
    workers: 1
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def error_text(path: str | None = None, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --- values -----------------------------------------------------------------

def test_defaults() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.as_dict() == DEFAULTS
    assert cfg.backend.greeting == "Hello"
    assert cfg.backend.service_args.workers == 1
    assert cfg.backend.service_args.capacity == 0
    assert cfg.frontend.port == 8000
    assert cfg.frontend.service_args.workers == 1
    assert cfg.broker.frontend == "tcp://127.0.0.1:5555"
    assert cfg.broker.max_message_size == 8388608


def test_seed_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SEED))
    assert cfg.backend.greeting == "Goodnight"
    assert cfg.backend.sleep_time == 1.0
    assert type(cfg.backend.sleep_time) is float
    assert cfg.backend.service_args.workers == 2
    assert cfg.backend.service_args.capacity == 0
    assert cfg.frontend.routing_mode == "round_robin"
    assert cfg.frontend.service_args.workers == 1
    assert cfg.broker.as_dict() == DEFAULTS["Broker"]


def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "Frontend:\n  port: 9000\n  host: 0.0.0.0\nBroker:\n  max_queue: 5\n")
    cfg = load_config(path)
    assert cfg.frontend.port == 9000
    assert cfg.frontend.host == "0.0.0.0"
    assert cfg.broker.max_queue == 5
    assert cfg.frontend.max_body == 1048576
    assert cfg.backend.as_dict() == DEFAULTS["Backend"]


def test_cli_override_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, "Backend:\n  greeting: FromFile\n  sleep_time: 2.5\n")
    cfg = load_config(path, ["Backend.greeting=FromCli"])
    assert cfg.backend.greeting == "FromCli"
    assert cfg.backend.sleep_time == 2.5


def test_override_without_file() -> None:
    cfg = load_config(None, ["Frontend.port=9001", "Broker.queue_timeout=0.5", "Frontend.port=9002"])
    assert cfg.frontend.port == 9002
    assert cfg.broker.queue_timeout == 0.5


def test_nested_override(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SEED), ["Backend.ServiceArgs.workers=3"])
    assert cfg.backend.service_args.workers == 3
    assert cfg.backend.service_args.capacity == 0
    assert cfg.frontend.service_args.workers == 1
    assert cfg.backend.greeting == "Goodnight"


def test_int_accepted_for_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "Broker:\n  request_timeout: 5\n"), ["Backend.sleep_time=0"])
    assert cfg.broker.request_timeout == 5.0
    assert type(cfg.broker.request_timeout) is float
    assert cfg.backend.sleep_time == 0.0
    assert type(cfg.backend.sleep_time) is float


def test_override_of_str_key_keeps_raw_string() -> None:
    cfg = load_config(None, ["Backend.greeting=123", "Frontend.host=", "Broker.frontend=ipc:///tmp/a=b"])
    assert cfg.backend.greeting == "123"
    assert cfg.frontend.host == ""
    assert cfg.broker.frontend == "ipc:///tmp/a=b"


def test_empty_file_and_null_sections(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).as_dict() == DEFAULTS
    cfg = load_config(write(tmp_path, "Backend:\nFrontend:\n  ServiceArgs:\n"))
    assert cfg.as_dict() == DEFAULTS


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backend.greeting = "changed"  # type: ignore[misc]


def test_as_dict_uses_yaml_spelling() -> None:
    cfg = load_config(None, ["Frontend.ServiceArgs.workers=4"])
    assert cfg.as_dict()["Frontend"]["ServiceArgs"] == {"workers": 4}
    assert list(cfg.as_dict()) == ["Backend", "Frontend", "Broker"]


# --- errors -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("Foo:\n  x: 1\n",
         "unknown section 'Foo' (valid sections: Backend, Frontend, Broker)"),
        ("Backend:\n  greting: Hi\n",
         "unknown key 'Backend.greting' (did you mean Backend.greeting? valid keys: greeting, sleep_time, drain_timeout, expose_errors, curve_key, ServiceArgs)"),
        ("Backend:\n  ServiceArgs:\n    worker: 2\n",
         "unknown key 'Backend.ServiceArgs.worker' (did you mean Backend.ServiceArgs.workers? valid keys: workers, capacity)"),
        ("Frontend:\n  port: abc\n",
         "Frontend.port: 'abc' is invalid: must be an integer from 1 to 65535"),
        ("Frontend:\n  port: 70000\n",
         "Frontend.port: 70000 is invalid: must be an integer from 1 to 65535"),
        ("Frontend:\n  port: 0\n",
         "Frontend.port: 0 is invalid: must be an integer from 1 to 65535"),
        ("Backend:\n  sleep_time: -1\n",
         "Backend.sleep_time: -1 is invalid: must be a number >= 0"),
        ("Broker:\n  heartbeat_interval: 0\n",
         "Broker.heartbeat_interval: 0 is invalid: must be a number > 0"),
        ("Broker:\n  max_retries: 1.5\n",
         "Broker.max_retries: 1.5 is invalid: must be an integer >= 0"),
        ("Backend:\n  ServiceArgs:\n    workers: true\n",
         "Backend.ServiceArgs.workers: True is invalid: must be an integer >= 1"),
        ("Backend:\n  greeting: 123\n",
         "Backend.greeting: 123 is invalid: must be a string"),
        ("Backend: 5\n",
         "Backend: 5 is invalid: must be a mapping with keys greeting, sleep_time, drain_timeout, expose_errors, curve_key, ServiceArgs"),
    ],
)
def test_file_value_errors(tmp_path: Path, yaml_text: str, message: str) -> None:
    assert error_text(write(tmp_path, yaml_text)) == message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("Foo.x=1", "unknown section 'Foo' (valid sections: Backend, Frontend, Broker)"),
        ("Backend.greting=Hi",
         "unknown key 'Backend.greting' (did you mean Backend.greeting? valid keys: greeting, sleep_time, drain_timeout, expose_errors, curve_key, ServiceArgs)"),
        ("Backend.ServiceArgs.worker=3",
         "unknown key 'Backend.ServiceArgs.worker' (did you mean Backend.ServiceArgs.workers? valid keys: workers, capacity)"),
        ("Frontend.port=abc", "Frontend.port: 'abc' is invalid: must be an integer from 1 to 65535"),
        ("Frontend.port=65536", "Frontend.port: 65536 is invalid: must be an integer from 1 to 65535"),
        ("Backend.sleep_time=-1", "Backend.sleep_time: -1 is invalid: must be a number >= 0"),
        ("Backend.expose_errors=1", "Backend.expose_errors: 1 is invalid: must be true or false"),
        ("Broker.max_message_size=65535",
         "Broker.max_message_size: 65535 is invalid: must be an integer >= 65536"),
        ("Backend.greeting.x=1",
         "unknown key 'Backend.greeting.x' (Backend.greeting is a value, not a section)"),
        ("Backend.ServiceArgs=3",
         "Backend.ServiceArgs is a section, not a key: use --Backend.ServiceArgs.KEY=value "
         "with KEY one of workers, capacity"),
        ("Backend.greeting", "override 'Backend.greeting' has no value: the form is --Section.key=value"),
        # What the user typed, not what YAML 1.1 reads it as (True).
        ("Backend.ServiceArgs.workers=yes",
         "Backend.ServiceArgs.workers: 'yes' is invalid: must be an integer >= 1"),
        ("Backnd.greeting=Hi",
         "unknown section 'Backnd' (did you mean Backend? valid sections: Backend, Frontend, Broker)"),
        ("backend.greeting=Hi",
         "unknown section 'backend' (did you mean Backend? valid sections: Backend, Frontend, Broker)"),
    ],
)
def test_override_errors(override: str, message: str) -> None:
    assert error_text(None, (override,)) == message


def test_a_boolean_key_takes_true_or_false() -> None:
    assert load_config(None, ["Backend.expose_errors=true"]).backend.expose_errors is True
    assert load_config(None, ["Backend.expose_errors=false"]).backend.expose_errors is False


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    assert error_text(path) == f"config file {path!r} not found"


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "Backend:\n  greeting: [unclosed\n")
    message = error_text(path)
    assert message.startswith(f"config file {path!r} is not valid YAML: ")
    assert "line 3, column 1" in message
    assert "\n" not in message


def test_top_level_list(tmp_path: Path) -> None:
    path = write(tmp_path, "- Backend\n- Frontend\n")
    assert error_text(path) == (
        f"config file {path!r}: top level must be a mapping of sections "
        "(Backend, Frontend, Broker), not a list"
    )


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "Backend:\n  greeting: 'multi\n\n  line'\n  sleep_time: \"a\\nb\"\n")
    assert error_text(path) == "Backend.sleep_time: 'a\\nb' is invalid: must be a number >= 0"


# --- split_overrides --------------------------------------------------------

def test_split_overrides_mixed_argv() -> None:
    argv = [
        "-f", "config.yaml",
        "--Backend.greeting=Hi",
        "--verbose",
        "--log-level=debug",
        "--Backend.ServiceArgs.workers=3",
        "--lower.case=1",
        "positional",
        "--Frontend.host=a=b",
    ]
    rest, overrides = split_overrides(argv)
    assert rest == ["-f", "config.yaml", "--verbose", "--log-level=debug", "--lower.case=1", "positional"]
    assert overrides == ["Backend.greeting=Hi", "Backend.ServiceArgs.workers=3", "Frontend.host=a=b"]
    cfg = load_config(None, overrides)
    assert (cfg.backend.greeting, cfg.backend.service_args.workers, cfg.frontend.host) == ("Hi", 3, "a=b")


def test_split_overrides_stops_at_double_dash() -> None:
    rest, overrides = split_overrides(["--Broker.max_queue=1", "--", "--Broker.max_queue=2"])
    assert rest == ["--", "--Broker.max_queue=2"]
    assert overrides == ["Broker.max_queue=1"]


def test_split_overrides_leaves_an_override_without_a_value_to_the_parser() -> None:
    # The parser refuses it, with the usage of the command it was given to.
    assert split_overrides(["--Backend.greeting", "Hi"]) == (["--Backend.greeting", "Hi"], [])


def test_closest_key_mends_case_and_typos() -> None:
    assert closest_key("backend.greting") == "Backend.greeting"
    assert closest_key("FRONTEND.serviceargs.workers") == "Frontend.ServiceArgs.workers"
    assert closest_key("Backend.ServiceArgs") is None  # a section, not a key
    assert closest_key("Nothing.like.it") is None


# --- endpoints and policies -------------------------------------------------

@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("Broker.frontend=localhost:5555",
         "Broker.frontend: 'localhost:5555' is not a ZeroMQ endpoint: use tcp://HOST:PORT "
         "(e.g. tcp://localhost:5555) or ipc:///path"),
        ("Broker.backend=5556",
         "Broker.backend: '5556' is not a ZeroMQ endpoint: use tcp://HOST:PORT "
         "(e.g. tcp://127.0.0.1:5555) or ipc:///path"),
        ("Broker.frontend=http://localhost:5555",
         "Broker.frontend: 'http://localhost:5555' has the scheme 'http': ZeroMQ endpoints "
         "here are tcp://HOST:PORT, ipc:///path or inproc://name"),
        ("Broker.frontend=tcp://localhost",
         "Broker.frontend: 'tcp://localhost' has no port: use tcp://HOST:PORT, "
         "e.g. tcp://localhost:5555"),
        ("Broker.frontend=tcp://:5555",
         "Broker.frontend: 'tcp://:5555' has no host: use tcp://HOST:PORT, "
         "e.g. tcp://127.0.0.1:5555"),
        ("Broker.backend=tcp://127.0.0.1:70000",
         "Broker.backend: 'tcp://127.0.0.1:70000' has the port '70000': "
         "a port is a number from 1 to 65535"),
        ("Broker.backend=tcp://127.0.0.1:0",
         "Broker.backend: 'tcp://127.0.0.1:0' has the port '0': a port is a number from 1 to 65535"),
        ("Broker.backend=ipc://", "Broker.backend: 'ipc://' names no address after ipc://"),
        ("Broker.policies=fewest",
         "Broker.policies: 'fewest' is not a policy class: name one as module:Class or "
         "path/to/file.py:Class (the built-in policies need no entry)"),
        ("Broker.policies=[a:B, 3]",
         "Broker.policies: '[a:B, 3]' is invalid: must be a list of strings"),
    ],
)
def test_endpoint_and_policy_errors_say_what_would_be_right(override: str, message: str) -> None:
    assert error_text(None, (override,)) == message


def test_endpoint_errors_come_from_the_file_too(tmp_path: Path) -> None:
    path = write(tmp_path, "Broker:\n  frontend: localhost:5555\n")
    assert error_text(path).startswith("Broker.frontend: 'localhost:5555' is not a ZeroMQ endpoint")


@pytest.mark.parametrize("frontend", ["tcp://127.0.0.1:5556", "tcp://localhost:5556",
                                      "tcp://*:5556"])
def test_frontend_and_backend_must_differ(frontend: str) -> None:
    assert error_text(None, (f"Broker.frontend={frontend}",)) == (
        f"Broker.frontend ({frontend}) and Broker.backend (tcp://127.0.0.1:5556) are the same "
        "endpoint: clients connect to Broker.frontend and workers to Broker.backend, "
        "so each needs its own (by default tcp://127.0.0.1:5555 and tcp://127.0.0.1:5556)")


@pytest.mark.parametrize("endpoint", ["tcp://*:6000", "tcp://[::1]:6000", "ipc:///tmp/zr.sock",
                                      "inproc://broker", "tcp://example.com:6000"])
def test_valid_endpoints(endpoint: str) -> None:
    assert load_config(None, [f"Broker.frontend={endpoint}"]).broker.frontend == endpoint


def test_same_port_on_two_hosts_is_allowed() -> None:
    cfg = load_config(None, ["Broker.frontend=tcp://10.0.0.1:6000",
                             "Broker.backend=tcp://10.0.0.2:6000"])
    assert cfg.broker.backend == "tcp://10.0.0.2:6000"


def test_policies_are_a_list_and_one_name_is_a_list_of_one(tmp_path: Path) -> None:
    path = write(tmp_path, "Broker:\n  policies: [mymodule:FewestCompleted, lib/p.py:P]\n")
    assert load_config(path).broker.policies == ("mymodule:FewestCompleted", "lib/p.py:P")
    cfg = load_config(None, ["Broker.policies=mymodule:FewestCompleted"])
    assert cfg.broker.policies == ("mymodule:FewestCompleted",)


def test_a_number_setting_takes_what_yaml_1_1_reads_as_a_string(tmp_path: Path) -> None:
    # PyYAML reads 1e-1 (no dot in the mantissa) as the string '1e-1'.
    assert load_config(write(tmp_path, "Backend:\n  sleep_time: 1e-1\n")).backend.sleep_time == 0.1
    assert load_config(None, ["Backend.sleep_time=2E0"]).backend.sleep_time == 2.0
    assert error_text(write(tmp_path, "Backend:\n  sleep_time: 1e\n")) == (
        "Backend.sleep_time: '1e' is invalid: must be a number >= 0")


@pytest.mark.parametrize("yaml_text, line, key, first", [
    ("Backend:\n  greeting: Hi\n  sleep_time: 0\n  greeting: Yo\n", 4, "greeting", 2),
    ("Backend:\n  greeting: Hi\nFrontend:\n  port: 1\nBackend:\n  sleep_time: 0\n", 5,
     "Backend", 1),
])
def test_a_key_given_twice_in_a_file_is_refused_with_its_lines(
        tmp_path: Path, yaml_text: str, line: int, key: str, first: int) -> None:
    path = write(tmp_path, yaml_text)
    assert error_text(path) == (f"config file {path!r}, line {line}: the key {key!r} is given "
                                f"twice (first on line {first}): keep one")


@pytest.mark.parametrize("host, expected", [("[::1]", "::1"), ("::1", "::1"),
                                            ("127.0.0.1", "127.0.0.1")])
def test_frontend_host_takes_an_ipv6_address_in_brackets_too(host: str, expected: str) -> None:
    assert load_config(None, [f"Frontend.host={host}"]).frontend.host == expected


# --- any settings class -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Greeter:
    """A class such as a service declares its keys with: plain defaults, or settings."""

    greeting: str = "Hello"
    repeat: int = setting(1, ge=1)


GreeterConfig = dataclasses.make_dataclass(
    "GreeterConfig", [("greeter", Greeter, section(Greeter, "Greeter"))], frozen=True)


def test_a_class_of_annotated_fields_is_read_from_its_section_like_the_built_in_ones() -> None:
    assert build(GreeterConfig, None).greeter == Greeter()
    config = build(GreeterConfig, {"Greeter": {"greeting": "Hi"}}, ["Greeter.repeat=3"])
    assert config.greeter == Greeter(greeting="Hi", repeat=3)
    with pytest.raises(ConfigError) as info:
        build(GreeterConfig, {"Greeter": {"repeat": 0}})
    assert str(info.value) == "Greeter.repeat: 0 is invalid: must be an integer >= 1"
    with pytest.raises(ConfigError) as info:
        build(GreeterConfig, None, ["Greeter.greting=Hi"])
    assert str(info.value) == ("unknown key 'Greeter.greting' (did you mean Greeter.greeting? "
                               "valid keys: greeting, repeat)")


def test_a_settings_class_with_a_type_no_key_can_have_is_refused_when_read() -> None:
    @dataclasses.dataclass
    class Odd:
        sizes: list[int] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError) as info:
        build(Odd, None)
    assert str(info.value).endswith("Odd.sizes: a setting is a str, int, float, bool (each "
                                    "may be `X | None`), tuple[str, ...] or list[str], or a "
                                    "section, not a list[int]")


# --- several brokers --------------------------------------------------------


def test_serve_s_brokers_take_ports_counting_up_by_two_and_peers_connect_to_each() -> None:
    broker = load_config(None, ["Broker.ServiceArgs.workers=3"]).broker
    assert broker.local_brokers() == [("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"),
                                      ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558"),
                                      ("tcp://127.0.0.1:5559", "tcp://127.0.0.1:5560")]
    assert broker.for_clients().endpoints == ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5557",
                                              "tcp://127.0.0.1:5559")
    assert broker.for_workers().endpoints == ("tcp://127.0.0.1:5556", "tcp://127.0.0.1:5558",
                                              "tcp://127.0.0.1:5560")


def test_ipc_brokers_are_numbered_by_name() -> None:
    broker = load_config(None, ["Broker.ServiceArgs.workers=2", "Broker.frontend=ipc:///run/zr-c",
                                "Broker.backend=ipc:///run/zr-w"]).broker
    assert broker.local_brokers() == [("ipc:///run/zr-c", "ipc:///run/zr-w"),
                                      ("ipc:///run/zr-c-2", "ipc:///run/zr-w-2")]


def test_listed_brokers_are_those_peers_connect_to(tmp_path: Path) -> None:
    path = write(tmp_path, "Broker:\n  frontends: [tcp://b1:5555, tcp://b2:5555]\n"
                           "  backends: [tcp://b1:5556, tcp://b2:5556]\n")
    broker = load_config(path).broker
    assert broker.for_clients().endpoints == ("tcp://b1:5555", "tcp://b2:5555")
    assert broker.for_workers().endpoints == ("tcp://b1:5556", "tcp://b2:5556")
    assert broker.frontend == "tcp://127.0.0.1:5555"  # what a broker binds, apart


@pytest.mark.parametrize("overrides, message", [
    (["Broker.frontends=[tcp://b1:5555, b2:5555]"],
     "Broker.frontends[1]: 'b2:5555' is not a ZeroMQ endpoint: use tcp://HOST:PORT "
     "(e.g. tcp://b2:5555) or ipc:///path"),
    (["Broker.backends=[tcp://b1:5556, tcp://b1:5556]"],
     "Broker.backends[1]: 'tcp://b1:5556' is listed already, at [0]: list each broker once"),
    (["Broker.frontends=[tcp://b1:5555]", "Broker.backends=[tcp://b1:5556, tcp://b2:5556]"],
     "Broker.frontends lists 1 endpoints and Broker.backends 2: list each broker's client "
     "and worker endpoint, in the same order"),
    (["Broker.ServiceArgs.workers=2", "Broker.backend=tcp://127.0.0.1:5557"],
     "Broker.ServiceArgs.workers: broker 2's frontend (tcp://127.0.0.1:5557) would be broker "
     "1's backend too: brokers take ports counting up by 2 from Broker.frontend and "
     "Broker.backend; give those two neighbouring ports (e.g. 5555 and 5556)"),
    (["Broker.ServiceArgs.workers=2", "Broker.frontend=tcp://127.0.0.1:65534",
      "Broker.backend=tcp://127.0.0.1:65535"],
     "Broker.ServiceArgs.workers: broker 2's frontend would be port 65536: give "
     "Broker.frontend and Broker.backend lower ports, or run fewer brokers"),
    (["Broker.ServiceArgs.workers=0"], "Broker.ServiceArgs.workers: 0 is invalid: must be an "
                                        "integer >= 1"),
    (["Broker.frontends=[tcp://127.0.0.1:5555, tcp://127.0.0.1:5556]"],
     "Broker.frontends[1]: tcp://127.0.0.1:5556 is a broker's worker endpoint (Broker.backends, "
     "or Broker.backend): clients and gateways connect to the brokers' client endpoints"),
    (["Broker.backends=[tcp://127.0.0.1:5555]"],
     "Broker.backends[0]: tcp://127.0.0.1:5555 is a broker's client endpoint (Broker.frontends, "
     "or Broker.frontend): workers connect to the brokers' worker endpoints"),
], ids=["bad-entry", "twice", "lengths", "clash", "past-65535", "none", "worker-endpoint",
        "client-endpoint"])
def test_broker_lists_and_counts_are_checked_in_one_line(overrides, message) -> None:
    assert error_text(overrides=tuple(overrides)) == message
