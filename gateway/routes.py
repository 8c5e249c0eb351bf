"""The routes a gateway serves besides the operators': each route of a path is a Forward
(to a broker service) or a Call (to a function run in the gateway process); a path may
have one route per method.

A Call's function receives the request's decoded JSON body (for GET, its query
parameters, a dict of str) and returns an async iterator of chunks, typically an async
generator: str, bytes, or any other value JSON can carry, sent as its JSON text
(zroute/chunks.py). CallStream runs it and offers its chunks as the broker client's
Stream offers a reply's, so that the gateway streams, times out, cuts and counts both
alike.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Union

from zroute import protocol as p
from zroute.chunks import as_chunk
from zroute.client import BrokerError, timeout_error
from zroute.errors import BadRequest

log = logging.getLogger("zroute.gateway")

CallFunction = Callable[[Any], AsyncIterator["str | bytes"]]
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
YIELD_EVERY = 256  # chunks a function yields before letting the loop run others


@dataclass(frozen=True)
class Forward:
    """Send the JSON body to the broker's `service` and stream a worker's reply."""

    service: str
    method: str = "POST"


@dataclass(frozen=True)
class Call:
    """Stream what `function(body)` yields, in the gateway process."""

    function: CallFunction
    method: str = "POST"


Route = Union[Forward, Call]
# A path's route, or its routes of different methods (GET and POST of /items, say).
Routes = dict[str, Union[Route, list[Route]]]
DEFAULT_ROUTES: Routes = {"/generate": Forward("generate")}


def check_routes(routes: Routes, reserved: tuple[str, ...]) -> dict[str, list[Route]]:
    """Each path's routes; ValueError, in one line, for a route the gateway cannot serve."""
    checked: dict[str, list[Route]] = {}
    for path, given in routes.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"route path {path!r} must be a string that starts with /")
        if path in reserved:
            raise ValueError(f"route path {path} is the gateway's own; the operators' "
                             f"paths ({', '.join(reserved)}) cannot be routes")
        checked[path] = given if isinstance(given, list) else [given]
        methods = [getattr(route, "method", None) for route in checked[path]]
        if len(set(methods)) < len(methods):
            raise ValueError(f"route {path} has two routes for one method: give each its own")
        for route in checked[path]:
            check_route(path, route)
    return checked


def check_route(path: str, route: Route) -> None:
    if not isinstance(route, (Forward, Call)):
        raise ValueError(f"route {path} is {type(route).__name__}, not Forward or Call")
    if route.method not in METHODS:
        raise ValueError(f"route {path} has method {route.method!r}; it must be one of "
                         f"{', '.join(METHODS)}")
    if isinstance(route, Forward) and not (isinstance(route.service, str) and route.service):
        raise ValueError(f"route {path} forwards to service {route.service!r}, "
                         "which is not a name")
    if isinstance(route, Call) and not callable(route.function):
        raise ValueError(f"route {path} calls {route.function!r}, which is not callable")


class CallStream:
    """A Call's function running in a task of its own, with the interface of the broker
    client's Stream (first, batch, complete, cancel) as the gateway uses it.

    The function runs ahead of the HTTP client by at most `max_ahead` bytes
    (Frontend.max_reply_buffer), then waits for it to read. cancel() (the client
    gone, the gateway stopping, the deadline) cancels its task and closes its iterator,
    so that its `finally` runs and the streams it opened are cancelled.
    Its exceptions become BrokerErrors: BadRequest is bad_request, a BrokerError (from a
    request to the broker) stays what it is, anything else is handler_error, logged
    with its traceback under the request id.
    """

    worker_id = None  # served in the gateway: no worker

    def __init__(self, function: CallFunction, body: Any, rid: bytes, path: str,
                 timeout: float, max_ahead: int, expose_errors: bool,
                 gateway_name: str) -> None:
        self.rid = rid
        self.path = path
        self.max_ahead = max_ahead
        self.expose_errors = expose_errors
        self.gateway_name = gateway_name
        self._chunks: list[bytes] = []
        self._ahead = 0  # bytes of _chunks
        self._done = False
        self._error: BrokerError | None = None
        self._arrived = asyncio.Event()  # a chunk or the end, for the consumer
        self._taken = asyncio.Event()  # the chunks were taken, for the function
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(function, body))
        self._deadline = loop.call_later(timeout, self.cancel,
                                         timeout_error("Frontend.request_timeout", timeout))

    @property
    def complete(self) -> bool:
        """True once the function's iterator has ended (not with an error)."""
        return self._done and self._error is None

    async def first(self) -> None:
        """Wait for the first chunk or the end; BrokerError if it failed before one."""
        while not self._chunks and not self._done:
            await self._wait()
        if not self._chunks and self._error is not None:
            raise self._error

    async def batch(self) -> list[bytes]:
        """Every chunk yielded since the last batch, waiting for one if none has; []
        at the end; BrokerError if the function failed."""
        while not self._chunks:
            if self._done:
                if self._error is not None:
                    raise self._error
                return []
            await self._wait()
        chunks, self._chunks, self._ahead = self._chunks, [], 0
        self._taken.set()
        return chunks

    def cancel(self, error: BrokerError | None = None) -> None:
        """Stop the function; a stream not yet ended ends with `error`."""
        self._end(error)
        self._task.cancel()  # no-op once it has finished

    async def _wait(self) -> None:
        self._arrived.clear()
        await self._arrived.wait()

    def _end(self, error: BrokerError | None) -> None:
        if self._done:
            return  # the first ending stands
        self._done, self._error = True, error
        self._deadline.cancel()
        self._arrived.set()

    async def _run(self, function: CallFunction, body: Any) -> None:
        chunks = None
        try:
            chunks = iterate(function(body))
            count = 0
            async for item in chunks:
                chunk = as_chunk(item, f"the route {self.path}")
                self._chunks.append(chunk)
                self._ahead += len(chunk)
                self._arrived.set()
                count += 1
                if self._ahead >= self.max_ahead:  # wait for the client to catch up
                    self._taken.clear()
                    await self._taken.wait()
                elif count % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a function that never awaits must not starve others
            self._end(None)
        except asyncio.CancelledError:
            pass  # cancel() ended the stream; the iterator is closed below
        except BrokerError as e:
            self._end(e)
        except BadRequest as e:
            self._end(BrokerError(p.E_BAD_REQUEST, str(e)))
        except Exception as e:
            log.exception("gateway %s: route %s failed on request=%s", self.gateway_name,
                          self.path, self.rid.decode())
            self._end(BrokerError(p.E_HANDLER, self._handler_error(e)))
        finally:
            await close(chunks)

    def _handler_error(self, error: Exception) -> str:
        """What the client is told of the function's exception: as the worker tells of
        its handler's (worker/runtime.py), the text only with Frontend.expose_errors."""
        if self.expose_errors:
            return f"{type(error).__name__}: {error}"
        return (f"the handler of {self.path} failed on request={self.rid.decode()}; "
                f"gateway {self.gateway_name}'s log has the details")


def iterate(result: Any) -> AsyncIterator[Any]:
    """The async iterator a Call's function returned; TypeError, said plainly, if it
    returned something else."""
    if inspect.iscoroutine(result):
        result.close()  # never awaited: no warning about it
        raise TypeError("the function is a coroutine function that returns; make it an "
                        "async generator (yield its chunks)")
    if not hasattr(result, "__aiter__"):
        raise TypeError(f"the function returned {type(result).__name__}, not an async "
                        "iterator of chunks")
    return result.__aiter__()


async def close(chunks: AsyncIterator[Any] | None) -> None:
    """Close the function's iterator, so that its `finally` runs now rather than when
    it is collected. What that `finally` raises is logged: nobody else would see it."""
    if chunks is None or not hasattr(chunks, "aclose"):
        return
    try:
        await chunks.aclose()
    except Exception:
        log.exception("a route's function failed while it was being closed")
