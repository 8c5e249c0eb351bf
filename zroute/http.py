"""Reading a gateway's POST /generate reply over HTTP, in each of its formats (plain
text, Server-Sent Events, NDJSON: docs/HTTP.md), with aiohttp:

    async with aiohttp.ClientSession() as session:
        async for chunk in generate(session, "http://localhost:8000", {"text": "a,b"}):
            print(chunk, end="")

Chunks come as text, as the worker yielded them. A reply that fails raises
HttpStreamError (a BrokerError, with its `code`): the JSON error of a request refused
before its stream began, the error a stream ended with, or `incomplete` for a stream
that ended without its end marker (cut short in transit). SSE and NDJSON tell all of
these apart; plain text cannot tell a last line `error: ...` from text, so its reader
raises only at the end, once the transfer proves incomplete, and the error line has been
yielded as text by then.
"""

from __future__ import annotations

import codecs
from typing import Any, AsyncIterator, Mapping

import aiohttp
import orjson

from zroute.client import BrokerError

PLAIN = "text/plain"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
MAX_LINE_BYTES = 16 << 20  # an SSE or NDJSON line longer than this is refused
E_INCOMPLETE = "incomplete"
E_BAD_REPLY = "bad_reply"


class HttpStreamError(BrokerError):
    """A reply that failed; `status` is its HTTP status (200 once its stream began)."""

    def __init__(self, code: str, message: str, status: int = 200) -> None:
        super().__init__(code, message)
        self.status = status


def incomplete() -> HttpStreamError:
    return HttpStreamError(E_INCOMPLETE, "the stream was cut short, before its end")


async def generate(session: aiohttp.ClientSession, base_url: str, body: Any, *,
                   accept: str = SSE, params: Mapping[str, str] | None = None
                   ) -> AsyncIterator[str]:
    """POST `body` (as JSON) to `base_url`/generate in the format `accept` (SSE, NDJSON
    or PLAIN); the reply's chunks. `params`: ?routing=, ?worker=."""
    async with session.post(f"{base_url.rstrip('/')}/generate", json=body, params=params,
                            headers={"Accept": accept}) as response:
        async for chunk in read_chunks(response):
            yield chunk


async def read_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The chunks of a /generate response, read as its Content-Type says."""
    if response.status != 200:
        try:
            error = orjson.loads(await response.read())
            raise HttpStreamError(error["code"], error["error"], response.status)
        except (orjson.JSONDecodeError, TypeError, KeyError):
            raise HttpStreamError(E_BAD_REPLY, f"HTTP {response.status} without a JSON error",
                                  response.status) from None
    reader = {SSE: read_sse, NDJSON: read_ndjson}.get(response.content_type, read_plain)
    async for chunk in reader(response):
        yield chunk


async def read_plain(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """Text as it arrives; HttpStreamError at the end if the transfer is incomplete, with
    the code of its last line `error: <code>: <message>`."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = ""  # the end of the text so far, where an error line would be
    try:
        async for data in response.content.iter_any():
            text = decoder.decode(data)
            tail = (tail + text)[-4096:]
            yield text
    except aiohttp.ClientPayloadError:
        last_line = tail.rstrip("\n").rpartition("\n")[2]
        if last_line.startswith("error: "):
            code, _, message = last_line.removeprefix("error: ").partition(": ")
            raise HttpStreamError(code, message) from None
        raise incomplete() from None


async def read_sse(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The data of each message event; `end` ends the stream, `error` raises its error."""
    async for event, data in read_events(response):
        if event == "message":
            yield data
        elif event == "end":
            return
        elif event == "error":
            raise stream_error(orjson.loads(data))
    raise incomplete()


async def read_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """Each Server-Sent Event as (type, data), "message" for an event that names no
    type: a /generate stream's, or GET /stats/stream's."""
    event, data = "", []
    async for line in lines(response):
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            continue  # a comment (":..."), or a field this reader does not need
        if data:  # a blank line ends an event, and one without data is none
            yield event or "message", "\n".join(data)
        event, data = "", []


async def read_ndjson(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The text of each `{"chunk": ...}`; `{"done": true}` ends the stream, an
    `{"error": ..., "code": ...}` raises."""
    async for line in lines(response):
        if not line:
            continue
        item = orjson.loads(line)
        if "chunk" in item:
            yield item["chunk"]
        elif item.get("done"):
            return
        elif "error" in item:
            raise stream_error(item)
    raise incomplete()


def stream_error(error: Mapping[str, str]) -> HttpStreamError:
    return HttpStreamError(error.get("code", E_BAD_REPLY), error.get("error", ""))


async def lines(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The body's lines (LF or CR LF), as they complete; a transfer cut short ends them
    (what came before the cut tells the readers how the stream ended)."""
    pending = bytearray()  # the line that has begun
    try:
        async for data in response.content.iter_any():
            start = 0
            while (end := data.find(b"\n", start)) != -1:
                pending += data[start:end]
                yield pending.removesuffix(b"\r").decode(errors="replace")
                pending.clear()
                start = end + 1
            pending += data[start:]
            if len(pending) > MAX_LINE_BYTES:
                raise HttpStreamError(E_BAD_REPLY, f"a line longer than {MAX_LINE_BYTES} bytes")
    except aiohttp.ClientPayloadError:
        return
