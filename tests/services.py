"""A service graph for tests: Frontend (HTTP) -> Middle -> Backend, run as
`tests/services.py:Frontend`. Middle's endpoints exercise what a dependency call can do;
each logs what a test waits for through the worker's logging."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

import orjson

from zroute import (BadRequest, CallError, api, depends, endpoint, forward, on_start, on_stop,
                    service)
from tests import handlers

log = logging.getLogger("tests.services")

STARTED_LINE = "{name} STARTED"
STOPPED_LINE = "{name} STOPPED after {served} request(s)"


@service(workers=2)
class Backend:
    greeting: str = "Hello"
    sleep_time: float = 0.0
    started: bool = False  # set by the start hook: a request tells whether it ran first

    @on_start
    async def setup(self) -> None:
        self.started = True
        self.served = 0
        log.info(STARTED_LINE.format(name="Backend"))

    @on_stop
    def teardown(self) -> None:
        log.info(STOPPED_LINE.format(name="Backend", served=self.served))

    @endpoint
    async def generate(self, text: str) -> AsyncIterator[str]:
        self.served += 1
        for word in text.split(","):
            await asyncio.sleep(self.sleep_time)
            yield f"{self.greeting} {word}!\n"

    @endpoint
    async def echo(self, request: Any) -> str:
        """The request as it arrived: its type and its JSON."""
        return f"{type(request).__name__} {orjson.dumps(request).decode()}"

    @endpoint
    async def ready(self, _: Any) -> str:
        return f"started={self.started}"

    @endpoint
    async def refuse(self, reason: str) -> AsyncIterator[str]:
        raise BadRequest(reason)
        yield  # an async generator, as endpoints may be

    @endpoint
    async def values(self, request: Any) -> AsyncIterator[Any]:
        """Chunks that are not str: the request, then a list, a number and a bool."""
        for value in (request, [1, "x"], 2.5, True):
            yield value

    @endpoint
    async def binary(self, _: Any) -> AsyncIterator[bytes]:
        """Chunks that are not UTF-8."""
        yield b"\xff\xfe"
        yield b"\x00\x80ok"

    @endpoint
    async def unencodable(self, _: Any) -> set:
        return {1, 2}

    @endpoint
    async def hang(self, marker: str) -> AsyncIterator[str]:
        """One chunk, then a wait until cancelled, which its log says (CANCELLED_LINE)."""
        async for chunk in handlers.hang({"marker": marker}):
            yield chunk


@service
class Middle:
    backend = depends(Backend)  # its calls without a policy: by Middle.routing_mode

    @endpoint
    async def generate(self, text: str) -> AsyncIterator[str]:
        async for chunk in self.backend.generate(text):
            yield chunk.upper()

    @endpoint
    async def route(self, request: dict) -> str:
        """Call Backend.echo with request["policy"] (and ["worker"]); the worker that
        served it."""
        call = self.backend.echo
        if request.get("worker"):
            stream = call.direct("x", request["worker"])
        elif request.get("policy"):
            stream = getattr(call, request["policy"])("x")
        else:
            stream = call("x")
        await stream.read()
        return stream.worker_id

    @endpoint
    async def workers(self, _: Any) -> str:
        """Backend's workers, then a call to the least loaded one, chosen here."""
        found = await self.backend.workers()
        best = min(found, key=lambda w: (w.load, w.id))
        stream = self.backend.echo.direct("x", best.id)
        await stream.read()
        return orjson.dumps({"workers": [[w.id, w.inflight, w.capacity] for w in found],
                             "chose": best.id, "served": stream.worker_id}).decode()

    @endpoint
    async def workers_at_once(self, calls: int) -> str:
        """How many workers each of `calls` concurrent workers() calls lists."""
        found = await asyncio.gather(*(self.backend.workers() for _ in range(calls)))
        return orjson.dumps(sorted({len(workers) for workers in found})).decode()

    @endpoint
    async def echo(self, request: Any) -> str:
        return await self.backend.echo(request).read()

    @endpoint
    async def refused(self, reason: str) -> str:
        try:
            await self.backend.refuse(reason).read()
        except CallError as e:
            return f"{e.code}: {e.message}"
        return "no error"

    @endpoint
    async def passes_on(self, reason: str) -> str:
        """Backend.refuse's error, not caught: the caller gets it as it came."""
        return await self.backend.refuse(reason).read()

    @endpoint
    async def values(self, request: Any) -> dict:
        """Backend.values' chunks, decoded, in one dict."""
        return {"values": [value async for value in self.backend.values(request).values()]}

    @endpoint
    async def binary(self, request: Any) -> AsyncIterator[bytes]:
        """Backend.binary's chunks, relayed unchanged."""
        async for chunk in self.backend.binary(request).raw():
            yield chunk

    @endpoint
    async def relay_hang_briefly(self, marker: str) -> AsyncIterator[str]:
        """Backend.hang with a deadline of its own, its timeout not caught."""
        async for chunk in self.backend.hang(marker, timeout=0.5):
            yield chunk

    @endpoint
    async def relay_hang(self, marker: str) -> AsyncIterator[str]:
        async for chunk in self.backend.hang(marker):
            yield chunk


@service
class Frontend:
    middle = depends(Middle)
    shout = forward("/shout", middle, "generate")  # the body, as it comes, to Middle

    @api(path="/generate", method="POST")
    async def generate(self, request: dict) -> AsyncIterator[str]:
        async for chunk in self.middle.generate(request["text"]):
            yield chunk

    @api(path="/generate", method="GET")
    async def query(self, query: dict) -> dict:
        """The query parameters, as a GET route receives them."""
        return {"query": query}

    @api(path="/hang")
    async def hang(self, request: dict) -> AsyncIterator[str]:
        async for chunk in self.middle.relay_hang(request["marker"]):
            yield chunk


# --- classes that cannot run -------------------------------------------------------------


@service
class FailsToStart:
    @on_start
    async def setup(self) -> None:
        raise ValueError("no model at /models/x")

    @endpoint
    async def generate(self, text: str) -> str:
        return text


@service
class NeedsModel:
    model: str  # required: no default
    size: int = 1

    @endpoint
    async def generate(self, text: str) -> str:
        return f"{self.model} {text}"


@service
class FailsToStartFront:
    fails = depends(FailsToStart)
    generate = forward("/generate", fails, "generate")
