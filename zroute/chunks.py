"""What a handler yields (or returns) as the bytes of one chunk: shared by the worker
runtime (endpoints, plain handlers) and the gateway (Call routes), so that both accept
the same values.

str is sent as UTF-8 and bytes as they are; anything else that JSON can carry (a dict, a
list, a number, a bool) is sent as its JSON text, one chunk per value, which a caller
across a dependency decodes with `CallStream.values()`. (A coroutine's None return is
no chunk at all: zroute/services.py.)
"""

from __future__ import annotations

from typing import Any

import orjson


def as_chunk(item: Any, handler: str) -> bytes:
    """`item` as the bytes of one chunk; TypeError naming `handler` and the type if it
    is neither str, bytes nor JSON-encodable. Callers on a hot path check str and bytes
    themselves first."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    try:
        return orjson.dumps(item)
    except TypeError as e:
        raise TypeError(f"{handler} yielded a {type(item).__name__}, which is not str, bytes "
                        f"or a value JSON can carry ({e})") from None
