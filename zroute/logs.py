"""Logging set-up shared by every zroute process: a name prefix, text or JSON lines.

A line may carry fields, `log.info("ok", extra=fields(request="3", status=200))`: the
message is then `request=3 status=200 ok`, and a JSON line has the fields as its own too.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

LOG_FORMATS = ("text", "json")


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """The `extra=` of a log call with fields. A float is a duration in seconds;
    None is a value that does not apply (shown as '-')."""
    return {"fields": values}


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}s"
    text = str(value)
    return repr(text) if not text or any(c.isspace() for c in text) else text


def message_with_fields(record: logging.LogRecord) -> str:
    """The record's fields as `key=value`, then its message."""
    parts = [f"{key}={_text_value(value)}" for key, value in getattr(record, "fields", {}).items()]
    message = record.getMessage()
    return " ".join([*parts, message] if message else parts)


class TextFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__(f"%(asctime)s [{process_name}] %(levelname)s %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = message_with_fields(record)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "process": self.process_name,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message_with_fields(record),
        }
        for key, value in getattr(record, "fields", {}).items():
            entry.setdefault(key, value)  # a field never hides the keys above
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(process_name: str, level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name) if fmt == "json"
                         else TextFormatter(process_name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
