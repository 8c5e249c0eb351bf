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

log = logging.getLogger("tests.handlers")

CANCELLED_LINE = "HANDLER-CANCELLED marker={marker}"
STARTED_LINE = "HANDLER-STARTED marker={marker}"


async def flaky(request: Any) -> AsyncIterator[str]:
    """Raise RuntimeError(request["fail"]) if it is given, else echo request["text"]."""
    if request.get("fail"):
        raise RuntimeError(request["fail"])
    yield f"fine {request['text']}\n"


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


def not_a_factory(config: Any) -> int:
    """A factory that returns something that is not a handler."""
    return 42


async def blocks(request: Any) -> AsyncIterator[str]:
    """A handler that blocks the event loop for request["seconds"], as a newcomer's might."""
    time.sleep(request["seconds"])
    yield "done\n"


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
