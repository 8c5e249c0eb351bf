"""Worker handlers for the gateway tests (`--handler tests.gateway_handlers:NAME`)."""

from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

FAILURE = "the test handler failed on purpose"


async def fail_mid_stream(request: Any) -> AsyncIterator[str]:
    """Yield one line, then fail: the HTTP response has begun when the error comes."""
    yield "Hello world!\n"
    raise RuntimeError(FAILURE)


async def echo(request: Any) -> AsyncIterator[bytes]:
    """Yield the request back as JSON."""
    yield orjson.dumps(request)
