"""Handlers for tests only; a worker loads them with `--handler tests.handlers:NAME`.

The worker process needs the repository root on PYTHONPATH (tests.support sets it).
Each handler logs through the worker's logging set-up, so what it observes shows
up in the worker's log file, where a test can wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

import orjson

log = logging.getLogger("tests.handlers")

CANCELLED_LINE = "HANDLER-CANCELLED marker={marker}"
STARTED_LINE = "HANDLER-STARTED marker={marker}"
FAILURE = "the test handler failed on purpose"
MEBIBYTE = b"x" * (1 << 20)


# --- replies -----------------------------------------------------------------------


async def echo(request: Any) -> AsyncIterator[bytes]:
    """Yield the request back as JSON."""
    yield orjson.dumps(request)


async def chunks(request: Any) -> AsyncIterator[str | bytes]:
    """Yield request["chunks"] one by one, as they are; with "hex": true, each is the
    hex of the bytes to yield (a character split between two chunks, say)."""
    for chunk in request["chunks"]:
        yield bytes.fromhex(chunk) if request.get("hex") else chunk


async def hold(request: Any) -> AsyncIterator[str]:
    """Yield "start TEXT" at once, wait request["seconds"] (default 0), yield "done TEXT".

    The first chunk tells a test that the request is running on its worker; a long
    `seconds` keeps that worker busy until the test cancels the request.
    """
    text = request["text"]
    yield f"start {text}\n"
    await asyncio.sleep(float(request.get("seconds", 0)))
    yield f"done {text}\n"


async def ticks(request: Any) -> AsyncIterator[str]:
    """A line every 0.1 s for 10 s."""
    for i in range(100):
        await asyncio.sleep(0.1)
        yield f"tick {i}\n"


async def hang(request: Any) -> AsyncIterator[str]:
    """Yield one chunk, then wait (almost) forever; log when cancelled.

    The log line names request["marker"], so that a test can wait for its own
    request's cancellation in the worker's output.
    """
    marker = request["marker"]
    log.info(STARTED_LINE.format(marker=marker))
    yield "first\n"
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        log.warning(CANCELLED_LINE.format(marker=marker))
        raise
    yield "never\n"


async def flood(request: Any) -> AsyncIterator[bytes]:
    """Yield 1 KiB chunks until cancelled; log when cancelled, as `hang` does."""
    chunk = b"x" * 1023 + b"\n"
    try:
        while True:
            yield chunk
            await asyncio.sleep(0.001)  # about 1 MiB/s: a reader that reads keeps up
    except asyncio.CancelledError:
        log.warning(CANCELLED_LINE.format(marker=request["marker"]))
        raise


async def forty_mebibytes(request: Any) -> AsyncIterator[bytes]:
    """40 MiB, one MiB every 50 ms."""
    for _ in range(40):
        yield MEBIBYTE
        await asyncio.sleep(0.05)


async def sized(request: Any) -> AsyncIterator[str | bytes]:
    """Yield "start" at once, wait request["seconds"] (default 0), then yield one chunk of
    request["bytes"] bytes."""
    yield "start\n"
    await asyncio.sleep(float(request.get("seconds", 0)))
    yield b"z" * int(request["bytes"])


# --- failures ----------------------------------------------------------------------


async def flaky(request: Any) -> AsyncIterator[str]:
    """Raise RuntimeError(request["fail"]) if it is given, else echo request["text"]."""
    if request.get("fail"):
        raise RuntimeError(request["fail"])
    yield f"fine {request['text']}\n"


async def fail_mid_stream(request: Any) -> AsyncIterator[str]:
    """Yield one line, then fail: the HTTP response has begun when the error comes."""
    yield "Hello world!\n"
    raise RuntimeError(FAILURE)


async def fail_at_once(request: Any) -> AsyncIterator[str]:
    """Fail before the first line: the gateway can still answer with a status."""
    raise RuntimeError(FAILURE)
    yield  # an async generator, as handlers are


async def yields_a_set(request: Any) -> AsyncIterator[Any]:
    """A broken handler: a chunk is str, bytes or a value JSON can carry."""
    yield {42}


def not_a_factory(config: Any) -> int:
    """A factory that returns something that is not a handler."""
    return 42


async def blocks(request: Any) -> AsyncIterator[str]:
    """A handler that blocks the event loop for request["seconds"], as a newcomer's might."""
    time.sleep(request["seconds"])
    yield "done\n"
