"""HTTP-side helpers for the gateway and `zroute serve` tests: real processes, real clients.

Builds on tests.support (Stack, Proc, free_port, wait_until); nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from tests.support import Proc, Stack, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
CURL = shutil.which("curl")
SEED_TEXT = "world,universe,galaxy"
SEED_OUTPUT = "Hello world!\nHello universe!\nHello galaxy!\n"


def async_test(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test function in a fresh event loop (fixtures still resolve by name)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def handler_worker(stack: Stack, worker_id: str, handler: str, *args: str,
                   sleep_time: float = 0) -> Proc:
    """A worker serving a handler of tests/handlers.py."""
    return stack.worker(worker_id, "--handler", f"tests.handlers:{handler}", *args,
                        sleep_time=sleep_time)


# --- plain HTTP (for polling from synchronous code) --------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> Reply | None:
    """One request with urllib; None if nothing answers (connection refused or timeout)."""
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()},
                         response.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())
    except (urllib.error.URLError, OSError):
        return None


def get_json(url: str) -> Any:
    """The JSON body at `url`, whatever the status; None if nothing answers."""
    reply = http("GET", url)
    return None if reply is None else reply.json()


# --- the gateway -------------------------------------------------------------------


@dataclass
class Gateway:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict | None:
        reply = http("GET", f"{self.url}/stats")
        return reply.json() if reply is not None and reply.status == 200 else None


def start_gateway(stack: Stack, *args: str, broker: str | None = None,
                  name: str = "gateway") -> Gateway:
    """`zroute gateway` on a free port; returns once it answers HTTP (any status)."""
    port = free_port()
    proc = stack.start(name, "gateway", "--broker", broker or stack.frontend,
                       "--port", str(port), *args)
    gateway = Gateway(proc, port)
    # GET /generate is answered (405) without asking the broker anything.
    wait_until(lambda: http("GET", f"{gateway.url}/generate") is not None, 15,
               f"the gateway on port {port} to answer")
    return gateway


def wait_healthy(gateway: Gateway, workers: int, timeout: float = 15.0) -> None:
    """Wait until /health says ok with exactly `workers` ready workers."""
    wait_until(lambda: get_json(f"{gateway.url}/health") == {"status": "ok", "workers": workers},
               timeout, f"/health to report {workers} ready worker(s)")


# --- curl ----------------------------------------------------------------------------


@dataclass
class CurlResult:
    returncode: int
    status: int | None
    headers: dict[str, str]  # lower-case names
    body: bytes
    stderr: str


def curl(url: str, *args: str, body: bytes | None = None, timeout: float = 20.0) -> CurlResult:
    """`curl -sS -i` (POST with `body` if given); headers and body split apart."""
    assert CURL, "curl is not installed"
    line = [CURL, "-sS", "-i", *args]
    if body is not None:
        line += ["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", "@-"]
    result = subprocess.run([*line, url], input=body or b"", capture_output=True, timeout=timeout)
    return parse_curl(result.returncode, result.stdout, result.stderr.decode(errors="replace"))


def parse_curl(returncode: int, output: bytes, stderr: str = "") -> CurlResult:
    head, sep, body = output.partition(b"\r\n\r\n")
    while sep and re.match(rb"HTTP/[\d.]+ 1\d\d ", head):  # e.g. 100 Continue
        head, sep, body = body.partition(b"\r\n\r\n")
    if not sep:
        return CurlResult(returncode, None, {}, output, stderr)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return CurlResult(returncode, int(status_line.split()[1]), headers, body, stderr)


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the gateway on one connection; everything it answers until it
    closes the connection (a test for a keep-alive answer reads it with recv instead)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


async def start_curl(url: str, body: bytes, *args: str) -> asyncio.subprocess.Process:
    """A streaming `curl -sS -N` POST whose output is read as it comes (stdout is a pipe)."""
    assert CURL, "curl is not installed"
    return await asyncio.create_subprocess_exec(
        CURL, "-sS", "-N", "-X", "POST", "-H", "Content-Type: application/json",
        "--data-binary", body.decode(), *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


# --- processes ---------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The pids of a process's children (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass  # the thread ended
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] == "Z" else fields[19]


def alive(pid: int, started: str | None) -> bool:
    """True if the process `pid` that started at `started` still runs (not a zombie)."""
    return started is not None and start_time(pid) == started
