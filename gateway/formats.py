"""The formats of a streamed reply, chosen once per request by its Accept header.

- plain text (the default): the chunks as the worker yields them; a failure after the
  first chunk is a last line `error: <code>: <message>`.
- Server-Sent Events (`Accept: text/event-stream`): one event per chunk, each line of the
  chunk a `data:` line of its own; then `event: end`, or `event: error` with the code
  and message as JSON.
- NDJSON (`Accept: application/x-ndjson`): one JSON object per line, `{"chunk": text}`
  per chunk; then `{"done": true}`, or `{"error": message, "code": code}`.

Plain text has no way to say how it ended but the transfer itself: a stream that fails
is cut short (the chunked body has no terminating chunk), so that a broken stream never
reads as a complete one. SSE and NDJSON say it in their last event or object, and their
transfer ends cleanly after it: a browser's fetch() drops what arrives just before a
cut, and the error with it.
"""

from __future__ import annotations

import codecs
import re
from typing import Protocol

import orjson

# What every streamed response says, so that a proxy in front passes each chunk on as
# it comes: nginx, for one, buffers a proxied response unless told not to.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
PLAIN = "text/plain; charset=utf-8"

# SSE ends a line at CR, LF or CR LF: each is a line of its own in a data: field.
LINE_END = re.compile(r"\r\n|\r|\n")


class StreamFormat(Protocol):
    content_type: str
    ends_in_band: bool  # its stream says how it ended: the transfer may end cleanly

    def encode(self, chunks: list[bytes], last: bool) -> bytes:
        """Chunks as the body carries them; `last`: they end the reply."""

    def error(self, code: str, message: str) -> bytes:
        """The end of a reply that failed after its first chunk."""


def sse_event(data: bytes | str, event: str = "") -> bytes:
    """One Server-Sent Event: `data` is one line (JSON, say) or the text of a chunk,
    whose lines each become a data: line; the event's name if it is not a message."""
    text = data.decode() if isinstance(data, bytes) else data
    head = f"event: {event}\n" if event else ""
    # "data:" alone for an empty line: the same to a reader, and no trailing space.
    lines = "".join(f"data: {line}\n" if line else "data:\n" for line in LINE_END.split(text))
    return f"{head}{lines}\n".encode()


def json_error(code: str, message: str) -> bytes:
    return orjson.dumps({"error": message, "code": code})


class Plain:
    content_type = PLAIN
    ends_in_band = False

    @staticmethod
    def encode(chunks: list[bytes], last: bool) -> bytes:
        return b"".join(chunks)

    @staticmethod
    def error(code: str, message: str) -> bytes:
        return f"\nerror: {code}: {message}\n".encode()


class TextChunks:
    """Chunks as text, for the formats that carry text: UTF-8 decoded across chunk
    boundaries (a character a worker split in two comes whole with the second part),
    and anything that is not UTF-8 as U+FFFD."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def texts(self, chunks: list[bytes], last: bool) -> list[str]:
        texts = []
        for chunk in chunks:
            text = self.decoder.decode(chunk)
            if text or not chunk:  # not a chunk that held only part of a character
                texts.append(text)
        rest = self.decoder.decode(b"", final=True) if last else ""
        if rest:
            texts.append(rest)
        return texts


class EventStream(TextChunks):
    content_type = SSE
    ends_in_band = True
    END = sse_event("", "end")

    def encode(self, chunks: list[bytes], last: bool) -> bytes:
        events = b"".join(sse_event(text) for text in self.texts(chunks, last))
        return events + self.END if last else events

    @staticmethod
    def error(code: str, message: str) -> bytes:
        return sse_event(json_error(code, message), "error")


class JsonLines(TextChunks):
    content_type = NDJSON
    ends_in_band = True
    END = b'{"done":true}\n'

    def encode(self, chunks: list[bytes], last: bool) -> bytes:
        lines = b"".join(orjson.dumps({"chunk": text}) + b"\n"
                         for text in self.texts(chunks, last))
        return lines + self.END if last else lines

    @staticmethod
    def error(code: str, message: str) -> bytes:
        return json_error(code, message) + b"\n"


PLAIN_FORMAT = Plain()
# The types a client may ask for, in the order that breaks a tie: plain text first.
OFFERED = ((PLAIN, Plain), (SSE, EventStream), (NDJSON, JsonLines))


def negotiate(accept: str | None) -> StreamFormat:
    """The format for a request's Accept header. Plain text unless the header prefers
    SSE or NDJSON: a header that names neither, or none that is acceptable, gets the
    plain text it always got (never a 406)."""
    if not accept:
        return PLAIN_FORMAT
    accept = accept.lower()  # media types are case-insensitive
    if "event-stream" not in accept and "ndjson" not in accept:
        return PLAIN_FORMAT  # the usual case, decided without parsing
    ranges = media_ranges(accept)
    best, best_score = Plain, (0.0, -1)
    for media_type, kind in OFFERED:
        score = preference(media_type, ranges)
        if score[0] > 0 and score > best_score:
            best, best_score = kind, score
    return PLAIN_FORMAT if best is Plain else best()


def media_ranges(accept: str) -> list[tuple[str, float]]:
    """A (lower-case) Accept header's media ranges, each with its q."""
    ranges = []
    for item in accept.split(","):
        media_range, *params = item.split(";")
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0  # a q that is not a number accepts nothing
        ranges.append((media_range.strip(), q))
    return ranges


def preference(media_type: str, ranges: list[tuple[str, float]]) -> tuple[float, int]:
    """(q, specificity) of the range that matches `media_type` most closely: the type
    itself (2), type/* (1), */* (0); (0, -1) if none does."""
    bare = media_type.partition(";")[0]
    wanted = {bare: 2, bare.partition("/")[0] + "/*": 1, "*/*": 0}
    matches = [(wanted[media_range], q) for media_range, q in ranges if media_range in wanted]
    if not matches:
        return 0.0, -1
    specificity, q = max(matches)
    return q, specificity
