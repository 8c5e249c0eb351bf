"""The private parts of pyzmq, aiohttp and Python that zroute's code uses, each for a gain
measured when it was chosen (docs/BENCHMARKS.md). A new version may remove or change any
of them without notice: each check here fails naming the part and the file that uses it.
pyproject.toml bounds pyzmq's and aiohttp's versions to those these checks have passed on.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import importlib
import inspect
import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import aiohttp
import pytest
import zmq
import zmq.backend
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.app import Gateway, GatewayConnection, GatewayServer, ReplyResponse
from zroute.settings import BrokerSettings, FrontendSettings

pytestmark = pytest.mark.timeout(10)

VERSIONS = {"pyzmq": zmq.__version__, "aiohttp": aiohttp.__version__,
            "Python": sys.version.split()[0]}


@dataclass(frozen=True)
class Internal:
    package: str  # a key of VERSIONS
    name: str  # the part, as the code uses it
    used_in: str  # where, and for what
    check: Callable[[], None]  # raises if the part is gone or behaves otherwise


# --- pyzmq: zroute/zmqio.py calls the compiled socket's methods with integer flags --------


def pair() -> tuple[zmq.Context, zmq.Socket, zmq.Socket]:
    context = zmq.Context()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    receiver.bind("inproc://internals")
    sender.connect("inproc://internals")
    return context, sender, receiver


def raises(error: type[Exception], call: Callable[[], object]) -> None:
    try:
        call()
    except error:
        return
    raise AssertionError(f"{call} did not raise {error.__name__}")


def with_pair(check: Callable[[ModuleType, zmq.Socket, zmq.Socket], None]) -> Callable[[], None]:
    """Run `check` with zroute/zmqio.py, imported here so that a part it imports that is
    gone fails the check too, and a pair of connected sockets."""
    @functools.wraps(check)
    def run() -> None:
        zmqio = importlib.import_module("zroute.zmqio")
        context, sender, receiver = pair()
        try:
            check(zmqio, sender, receiver)
        finally:
            sender.close(0)
            receiver.close(0)
            context.term()
    return run


def compiled_socket_is_a_base_of_zmq_socket() -> None:
    assert issubclass(zmq.Socket, zmq.backend.Socket), zmq.Socket.__mro__


def send_and_recv_take_integer_flags(zmqio: ModuleType, sender: zmq.Socket,
                                     receiver: zmq.Socket) -> None:
    zmqio.send_frames(sender, [b"a", b"b", b"c"])
    assert zmqio.recv_frames(receiver, 10) == [b"a", b"b", b"c"]
    raises(zmq.Again, lambda: zmqio.recv_frames(receiver, 10))  # NOBLOCK: nothing waits


def tracked_send_returns_a_tracker(zmqio: ModuleType, sender: zmq.Socket,
                                   receiver: zmq.Socket) -> None:
    zmqio.track_every_message(sender)
    tracker = zmqio.send_tracked(sender, [b"a", b"b"])
    assert isinstance(tracker, zmq.MessageTracker), tracker
    assert zmqio.recv_frames(receiver, 10) == [b"a", b"b"]
    tracker.wait(5)


def get_reads_events_and_rcvmore(zmqio: ModuleType, sender: zmq.Socket,
                                 receiver: zmq.Socket) -> None:
    assert not zmqio.readable(receiver)
    zmqio.send_frames(sender, [b"a"] * 4)
    assert receiver.poll(5000)  # the message has arrived
    assert zmqio.readable(receiver)
    # Past its 2 frames, recv_frames reads RCVMORE to the end of the message.
    raises(zmqio.TooManyFrames, lambda: zmqio.recv_frames(receiver, 2))
    assert not zmqio.readable(receiver)


PYZMQ = [
    Internal("pyzmq", "zmq.backend.Socket, a base class of zmq.Socket",
             "zroute/zmqio.py, which calls its methods on zmq.Socket objects",
             compiled_socket_is_a_base_of_zmq_socket),
    Internal("pyzmq", "zmq.backend.Socket.send(socket, frame, flags) and "
             "zmq.backend.Socket.recv(socket, flags), with integer flags",
             "zroute/zmqio.py (send_frames, recv_frames)",
             with_pair(send_and_recv_take_integer_flags)),
    Internal("pyzmq", "zmq.backend.Socket.send(socket, frame, flags, copy=False, track=True), "
             "which returns a zmq.MessageTracker",
             "zroute/zmqio.py (send_tracked, for zroute/unreleased.py)",
             with_pair(tracked_send_returns_a_tracker)),
    Internal("pyzmq", "zmq.backend.Socket.get(socket, option), with integer options "
             "(EVENTS, RCVMORE)",
             "zroute/zmqio.py (readable, recv_frames)", with_pair(get_reads_events_and_rcvmore)),
]


# --- aiohttp: gateway/app.py subclasses its connection handler and its server -----------


def gateway_server(check: Callable[[GatewayServer, GatewayConnection], None]) -> Callable[[], None]:
    """Run `check` on a gateway's server and a connection of it, as aiohttp makes them."""
    settings = FrontendSettings(max_connections=10)

    async def objects() -> None:
        server = Gateway(settings, BrokerSettings().for_clients()).server()
        check(server, server())

    @functools.wraps(check)
    def run() -> None:
        asyncio.run(objects())
    return run


def handler_state(server: GatewayServer, connection: GatewayConnection) -> None:
    # data_received: _messages holds the heads parsed and not yet handled; _waiter is set
    # while the handler waits for one.
    assert isinstance(connection._messages, collections.deque), type(connection._messages)
    assert connection._waiter is None, connection._waiter
    assert connection._manager is server, connection._manager
    assert connection._loop is asyncio.get_running_loop(), connection._loop


def handler_takes_its_manager_and_loop(server: GatewayServer, connection: GatewayConnection) -> None:
    parameters = inspect.signature(RequestHandler.__init__).parameters
    assert list(parameters)[:3] == ["self", "manager", "loop"], list(parameters)
    assert parameters["loop"].kind is inspect.Parameter.KEYWORD_ONLY
    assert isinstance(connection, RequestHandler)


def server_state(server: GatewayServer, connection: GatewayConnection) -> None:
    assert isinstance(server._connections, dict), type(server._connections)
    assert server._kwargs.get("keepalive_timeout") == server.settings.keepalive_timeout, \
        server._kwargs
    assert server._loop is asyncio.get_running_loop(), server._loop


def handle_error_signature() -> None:
    parameters = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert parameters == ["self", "request", "status", "exc", "message"], parameters


def request_factory_arguments() -> None:
    # What aiohttp passes a request factory: its own factory's parameters.
    parameters = list(inspect.signature(web.Server._make_request).parameters)
    assert parameters == ["self", "message", "payload", "protocol", "writer", "task"], parameters


def base_request_signature() -> None:
    parameters = inspect.signature(web.BaseRequest.__init__).parameters
    assert list(parameters)[:7] == ["self", "message", "payload", "protocol", "payload_writer",
                                    "task", "loop"], list(parameters)
    assert parameters["client_max_size"].kind is inspect.Parameter.KEYWORD_ONLY


def headers_wait_for_the_first_write() -> None:
    # web.Response sets the flag to False to send its headers with its body; StreamResponse
    # sends them at prepare() unless a subclass sets it so too.
    assert web.StreamResponse._send_headers_immediately is True
    assert web.Response._send_headers_immediately is False
    assert ReplyResponse._send_headers_immediately is False


AIOHTTP = [
    Internal("aiohttp", "RequestHandler._messages, _waiter, _manager and _loop",
             "gateway/app.py (GatewayConnection: its connection cap and header timeout)",
             gateway_server(handler_state)),
    Internal("aiohttp", "RequestHandler(manager, *, loop, **kwargs)",
             "gateway/app.py (GatewayServer.__call__ makes GatewayConnection so)",
             gateway_server(handler_takes_its_manager_and_loop)),
    Internal("aiohttp", "RequestHandler.handle_error(request, status, exc, message)",
             "gateway/app.py (GatewayConnection overrides it: JSON errors)",
             handle_error_signature),
    Internal("aiohttp", "web.Server._connections, _kwargs and _loop",
             "gateway/app.py (GatewayServer: its connection count and its connections)",
             gateway_server(server_state)),
    Internal("aiohttp", "web.Server's request_factory(message, payload, protocol, writer, task)",
             "gateway/app.py (Gateway._make_request)", request_factory_arguments),
    Internal("aiohttp", "web.BaseRequest(message, payload, protocol, payload_writer, task, "
             "loop, *, client_max_size)",
             "gateway/app.py (Gateway._make_request: Frontend.max_body)", base_request_signature),
    Internal("aiohttp", "StreamResponse._send_headers_immediately",
             "gateway/app.py (ReplyResponse: headers leave with the first chunk)",
             headers_wait_for_the_first_write),
]


# --- Python --------------------------------------------------------------------------


def current_frames_by_thread() -> None:
    frames = sys._current_frames()
    assert frames[threading.get_ident()] is not None, frames


def parser_lists_its_actions() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", help="a port")
    options = {o: action.help for action in parser._actions for o in action.option_strings}
    assert options["--port"] == "a port", options


PYTHON = [
    Internal("Python", "sys._current_frames()",
             "worker/watchdog.py (where a handler blocks the event loop)",
             current_frames_by_thread),
    Internal("Python", "argparse.ArgumentParser._actions",
             "zroute_cli/command.py (the option a mistyped one is closest to)",
             parser_lists_its_actions),
]


@pytest.mark.parametrize("internal", PYZMQ + AIOHTTP + PYTHON,
                         ids=lambda internal: internal.check.__name__)
def test_a_private_part_the_code_uses_is_still_there(internal: Internal):
    try:
        internal.check()
        return
    except Exception as e:  # assertions included: each says what it found instead
        problem = f"{type(e).__name__}: {e}"
    version = VERSIONS[internal.package]
    bound = ("" if internal.package == "Python" else
             f", or bound {internal.package} below {version} in pyproject.toml")
    pytest.fail(f"{internal.package} {version} removed or changed {internal.name}, which "
                f"{internal.used_in} uses: {problem}. Adapt that code{bound}.", pytrace=False)
