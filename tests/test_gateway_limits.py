"""What one HTTP peer may cost the gateway: time (idle, slow heads, slow bodies, replies
it does not read), connections and bytes. Real processes, raw sockets on loopback."""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.http_support import Gateway, http, parse_curl, raw_http, start_gateway, wait_healthy
from tests.support import ZROUTE, Proc, Stack, all_idle, free_port, wait_until

pytestmark = pytest.mark.timeout(30)

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
TEXT_A = b'{"text": "a"}'


def generate(body: bytes, worker: str = "worker-1") -> bytes:
    return (f"POST /generate?worker={worker} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length from a connection that may stay open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    result = parse_curl(0, data)
    length = int(result.headers["content-length"])
    body = result.body
    while len(body) < length:
        body += sock.recv(65536)
    return result.status, result.headers, body


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Wait for the gateway to close the connection; how long it took."""
    started = time.monotonic()
    sock.settimeout(seconds)
    while sock.recv(65536):  # anything before the close (an answer) is read past
        pass
    return time.monotonic() - started


def json_error(reply: bytes, status: int, code: str) -> dict:
    result = parse_curl(0, reply)
    assert (result.status, result.headers["content-type"]) == (status, "application/json"), reply
    body = json.loads(result.body)
    assert body["code"] == code, body
    return result.headers


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A broker, worker-1 (the greeting) and flooder (40 MiB replies), and a gateway with
    short timeouts and small buffers."""
    stack = Stack(tmp_path_factory.mktemp("limits"))
    try:
        stack.broker()
        stack.worker("worker-1")
        stack.worker("flooder", "--handler", "tests.handlers:forty_mebibytes")
        gateway = start_gateway(stack, "--Frontend.header_timeout=1",
                                "--Frontend.body_timeout=1", "--Frontend.keepalive_timeout=3",
                                "--Frontend.send_timeout=1", "--Frontend.max_body=1000",
                                "--Frontend.max_buffered_bytes=1500",
                                "--Frontend.max_reply_buffer=2097152")
        wait_healthy(gateway, 2)
        yield SimpleNamespace(stack=stack, gateway=gateway)
    finally:
        stack.close()


# --- time ----------------------------------------------------------------------------


def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(limited):
    with connect(limited.gateway.port) as sock:
        sock.sendall(HEALTH)
        assert read_response(sock)[0] == 200  # kept alive...
        assert 2.5 < closed_within(sock, 10) < 6  # ...for Frontend.keepalive_timeout (3 s)
    with connect(limited.gateway.port) as sock:  # one that never sends anything
        json_error(raw_reply(sock), 408, "header_timeout")  # its first head is due too


def test_a_request_head_sent_byte_by_byte_is_cut_with_408(limited):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
    with connect(limited.gateway.port) as sock:
        started = time.monotonic()
        for byte in head:  # 10 bytes a second: the whole head would take 12 s
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.1)[0]:
                break  # the gateway answered
        reply = raw_reply(sock)
    elapsed = time.monotonic() - started
    json_error(reply, 408, "header_timeout")
    assert 0.9 < elapsed < 3, elapsed  # Frontend.header_timeout is 1 s


def test_a_request_line_without_an_http_version_is_cut_too(limited):
    with connect(limited.gateway.port) as sock:
        sock.sendall(b"GET /health\r\n")  # HTTP/0.9, which has no blank line after it
        json_error(raw_reply(sock), 408, "header_timeout")


def test_a_body_sent_byte_by_byte_is_cut_with_408(limited):
    body = TEXT_A.ljust(200)
    request = generate(body)
    head_end = request.index(b"\r\n\r\n") + 4
    with connect(limited.gateway.port) as sock:
        sock.sendall(request[:head_end + 5])
        started = time.monotonic()
        for byte in request[head_end + 5:]:
            if select.select([sock], [], [], 0.1)[0]:
                break
            sock.sendall(bytes([byte]))
        reply = raw_reply(sock)
    elapsed = time.monotonic() - started
    json_error(reply, 408, "body_timeout")
    assert 0.9 < elapsed < 3, elapsed  # Frontend.body_timeout is 1 s


def raw_reply(sock: socket.socket) -> bytes:
    """What the gateway sends until it closes the connection."""
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    return reply


# --- connections ---------------------------------------------------------------------


def test_connections_over_max_connections_get_a_json_503_and_the_rest_are_served(stack):
    stack.broker()
    stack.worker("worker-1")
    gateway = start_gateway(stack, "--Frontend.max_connections=3")
    wait_healthy(gateway, 1)
    held = [connect(gateway.port) for _ in range(3)]
    try:
        for sock in held:  # each is open, and served
            sock.sendall(HEALTH)
            assert read_response(sock)[0] == 200
        refused = raw_http(gateway.port, HEALTH)  # answered, then closed
        headers = json_error(refused, 503, "too_many_connections")
        assert headers["retry-after"] == "1"
        for sock in held:  # the ones held are still served
            sock.sendall(HEALTH)
            assert read_response(sock)[0] == 200
        held.pop().close()
        wait_until(lambda: (reply := http("GET", f"{gateway.url}/health")) and
                   reply.status == 200, 5, "a connection to be accepted again")
    finally:
        for sock in held:
            sock.close()
    assert "Traceback" not in gateway.proc.output()


def test_the_gateway_raises_its_open_file_limit_and_sizes_its_connection_cap_from_it(stack):
    """With the usual soft limit (1,024 here 256) a few hundred idle connections would
    make accept() fail for everyone."""
    stack.broker()
    stack.wait_stats(lambda stats: True, 15, "the broker to answer")  # before it is stopped
    port = free_port()
    lowered = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
               "(256, 2048)); os.execv(sys.argv[1], sys.argv[1:])")
    proc = Proc("gateway", [sys.executable, "-c", lowered, ZROUTE, "gateway", "--broker",
                            stack.frontend, "--port", str(port)], stack.log_dir)
    stack.procs.append(proc)
    gateway = Gateway(proc, port)
    wait_until(lambda: "gateway listening" in proc.output(), 15, "the gateway to listen")
    limits = Path(f"/proc/{proc.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines()
            if line.startswith("Max open files")] == [["2048", "2048"]], limits
    assert "at most 1984 connections" in proc.output()  # 2048 less 64 kept for the rest
    assert http("GET", f"{gateway.url}/generate").status == 405


# --- bytes ---------------------------------------------------------------------------


def test_bodies_over_max_buffered_bytes_get_a_json_503_until_the_budget_frees(limited):
    """Frontend.max_buffered_bytes is 1500 here: one body of 1000 bytes being read leaves
    no room for a second one."""
    body = TEXT_A.ljust(1000)
    request = generate(body)
    with connect(limited.gateway.port) as first:
        first.sendall(request[:-500])  # its body is being read: 1000 bytes counted
        wait_until(lambda: b'"gateway_busy"' in raw_http(limited.gateway.port, request), 5,
                   "the second body to be refused")
        headers = json_error(raw_http(limited.gateway.port, request), 503, "gateway_busy")
        assert headers["retry-after"] == "1"
        first.sendall(request[-500:])
        assert raw_reply(first).split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    reply = raw_http(limited.gateway.port, request)  # room again
    assert reply.split(b"\r\n")[0] == b"HTTP/1.1 200 OK", reply


def test_a_client_that_does_not_read_its_reply_is_cut_off_and_costs_little(limited):
    """The flooder sends 40 MiB, 1 MiB at a time; the client reads none of it. Once the
    kernel's buffers are full, the stream is cancelled when Frontend.max_reply_buffer
    (2 MiB) waits for the client, and the connection is cut after Frontend.send_timeout
    (1 s) without progress."""
    gateway = limited.gateway
    rss_before = rss_kib(gateway.proc.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    sock.settimeout(10)
    sock.connect(("127.0.0.1", gateway.port))
    with sock:
        sock.sendall(generate(b"{}", worker="flooder"))
        wait_until(lambda: "cut connections that read nothing" in gateway.proc.output(), 10,
                   "the gateway to cut the connection")
        with pytest.raises(ConnectionResetError):
            while sock.recv(1 << 20):  # what the kernel holds, then the reset
                pass
    limited.stack.wait_stats(all_idle, 10, "the flooder's request to end")
    assert rss_kib(gateway.proc.pid) - rss_before < 32 << 10  # not 40 MiB
    reply = raw_http(gateway.port, generate(TEXT_A))  # and the gateway serves others
    assert reply.split(b"\r\n")[0] == b"HTTP/1.1 200 OK", reply
    assert "Traceback" not in gateway.proc.output()


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def test_a_reply_chunk_over_max_reply_buffer_reaches_a_client_that_reads(stack):
    """Only bytes the client leaves unread count against Frontend.max_reply_buffer
    (256 KiB by default): one chunk larger than that passes."""
    stack.broker()
    stack.worker("sizer", "--handler", "tests.handlers:sized")
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    reply = http("POST", f"{gateway.url}/generate", b'{"bytes": 600000}', timeout=10)
    assert (reply.status, reply.body) == (200, b"start\n" + b"z" * 600_000)
