"""Running a component's asyncio event loop."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

try:
    import uvloop
except ImportError:  # uvloop does not run on Windows
    uvloop = None


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run `main` to completion on uvloop where it is installed, else on asyncio's loop.

    uvloop's loop and transports cost less CPU per request than asyncio's own."""
    if uvloop is not None:
        return uvloop.run(main)
    return asyncio.run(main)
