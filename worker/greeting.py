"""The built-in graph: the greeting pipeline of the simple pipeline, as service classes.

`Backend.generate` (registered as `generate`) waits `sleep_time` seconds before each
comma-separated word of `text` (or of a request that is a plain string) and yields
"{greeting} {word}!\\n". asyncio.sleep, not time.sleep, so one worker serves many requests
at once and a cancelled request stops at once. `Frontend` is served by the gateway: its
/generate passes each request, as it comes, to Backend (with ?routing=, ?worker= and every
streaming format). `zroute serve` with no graph serves this one.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from zroute.errors import BadRequest
from zroute.services import depends, endpoint, forward, service
from zroute.protocol import DEFAULT_POLICY
from zroute.settings import setting


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


@service
class Backend:
    greeting: str = "Hello"
    sleep_time: float = setting(1.0, ge=0)  # seconds before each word

    @endpoint(name="generate")  # the broker's service, as clients have always named it
    async def generate(self, request: Any) -> AsyncIterator[str]:
        for word in words_of(request):
            if self.sleep_time:
                await asyncio.sleep(self.sleep_time)
            yield f"{self.greeting} {word}!\n"


@service
class Frontend:
    backend = depends(Backend)
    routing_mode: str = DEFAULT_POLICY  # Frontend.routing_mode: the gateway's default policy
    generate = forward("/generate", backend, "generate")
