"""The default handler: the greeting backend of the simple pipeline.

For each comma-separated word of `text` (or of a request that is a plain string) it
waits `sleep_time` seconds and yields "{greeting} {word}!\\n". asyncio.sleep, not
time.sleep, so one worker serves many requests at once and a cancelled request stops
at once.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from worker.runtime import BadRequest, Handler


def words(text: str) -> list[str]:
    """The words of a comma-separated text, stripped, empty ones skipped."""
    stripped = (word.strip() for word in text.split(","))
    return [word for word in stripped if word]


def words_of(request: Any) -> list[str]:
    """The words of a request: `{"text": "a,b"}`, or the plain string "a,b"."""
    text = request.get("text") if isinstance(request, dict) else request
    if not isinstance(text, str):
        raise BadRequest('body must be a JSON object with a string field "text"')
    found = words(text)
    if not found:
        raise BadRequest('"text" has no words: give comma-separated words, e.g. "a,b"')
    return found


def make_handler(config: Any) -> Handler:
    """Build the handler from the `Backend` section of a configuration."""
    greeting = config.backend.greeting
    sleep_time = config.backend.sleep_time

    async def generate(request: Any) -> AsyncIterator[str]:
        for word in words_of(request):
            if sleep_time:
                await asyncio.sleep(sleep_time)
            yield f"{greeting} {word}!\n"

    return generate
