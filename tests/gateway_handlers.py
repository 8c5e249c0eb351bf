"""Worker handlers for the gateway tests (`--handler tests.gateway_handlers:NAME`)."""

from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

FAILURE = "the test handler failed on purpose"


async def fail_mid_stream(request: Any) -> AsyncIterator[str]:
    """Yield one line, then fail: the HTTP response has begun when the error comes."""
    yield "Hello world!\n"
    raise RuntimeError(FAILURE)


async def fail_at_once(request: Any) -> AsyncIterator[str]:
    """Fail before the first line: the gateway can still answer with a status."""
    raise RuntimeError(FAILURE)
    yield  # an async generator, as handlers are


async def echo(request: Any) -> AsyncIterator[bytes]:
    """Yield the request back as JSON."""
    yield orjson.dumps(request)


async def chunks(request: Any) -> AsyncIterator[str | bytes]:
    """Yield request["chunks"] one by one, as they are; with "hex": true, each is the
    hex of the bytes to yield (a character split between two chunks, say)."""
    for chunk in request["chunks"]:
        yield bytes.fromhex(chunk) if request.get("hex") else chunk
