"""zroute's shared library; its names for writing services (zroute/services.py)."""

from zroute.errors import BadRequest
from zroute.services import (CallError, api, depends, endpoint, forward, on_start, on_stop,
                             service)

__all__ = ["service", "endpoint", "api", "depends", "on_start", "on_stop", "forward",
           "CallError", "BadRequest"]
