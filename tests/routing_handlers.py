"""Handlers for the routing tests; a worker loads them with `--handler tests.routing_handlers:NAME`.

The worker process needs the repository root on PYTHONPATH (tests.support sets it).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator


async def hold(request: Any) -> AsyncIterator[str]:
    """Yield "start TEXT" at once, wait request["seconds"] (default 0), yield "done TEXT".

    The first chunk tells a test that the request is running on its worker; a long
    `seconds` keeps that worker busy until the test cancels the request.
    """
    text = request["text"]
    yield f"start {text}\n"
    await asyncio.sleep(float(request.get("seconds", 0)))
    yield f"done {text}\n"
