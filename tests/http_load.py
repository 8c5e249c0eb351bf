"""HTTP load for the multi-host tests, run on a host of their network:
`python -m tests.http_load URL --body JSON --concurrency C [--requests N] [--timeout S]`.

C streams each POST the body to URL, one request after another, until N requests have
been sent in all (with N 0, until SIGTERM: then the requests in flight finish). It prints
one JSON line when a request's first line arrives, {"event": "first_line", "worker": ID},
and one when a request ends:

    {"event": "end", "status": 200, "worker": "worker-2", "lines": ["Hello a!\\n", ...],
     "complete": true, "error": null, "first": 0.012, "total": 0.031}

`complete` says that the body ended as HTTP says it should (a stream the gateway cut has
no last chunk), `error` what went wrong on the client's side, `first` and `total` the
seconds to the first line and to the end. A request still going after `timeout` seconds
ends with the error "hung".
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import time
from typing import Any, Iterator

import aiohttp
import orjson


def report(event: dict[str, Any]) -> None:
    print(orjson.dumps(event).decode(), flush=True)


async def one(session: aiohttp.ClientSession, url: str, body: bytes,
              result: dict[str, Any]) -> None:
    """POST `body` and read the reply line by line into `result`."""
    started = time.monotonic()
    try:
        async with session.post(url, data=body,
                                headers={"Content-Type": "application/json"}) as response:
            result["status"] = response.status
            result["worker"] = response.headers.get("X-Worker-Id")
            async for line in response.content:
                if result["first"] is None:
                    result["first"] = time.monotonic() - started
                    report({"event": "first_line", "worker": result["worker"]})
                result["lines"].append(line.decode(errors="replace"))
            result["complete"] = True
    except aiohttp.ClientError as e:
        result["error"] = f"{type(e).__name__}: {e}"


async def stream(session: aiohttp.ClientSession, args: argparse.Namespace,
                 numbers: Iterator[int], stopping: asyncio.Event) -> None:
    """Send requests one after another, and print how each went, while the run lasts."""
    body = args.body.encode()
    while not stopping.is_set() and (not args.requests or next(numbers) <= args.requests):
        result: dict[str, Any] = {"event": "end", "status": None, "worker": None, "lines": [],
                                  "complete": False, "error": None, "first": None}
        started = time.monotonic()
        try:
            await asyncio.wait_for(one(session, args.url, body, result), args.timeout)
        except asyncio.TimeoutError:
            result["error"] = "hung"
        result["total"] = time.monotonic() - started
        report(result)


async def main(args: argparse.Namespace) -> None:
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    numbers = itertools.count(1)  # shared by the streams: the requests sent in all
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=None)  # each request is bounded by --timeout
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(stream(session, args, numbers, stopping)
                               for _ in range(args.concurrency)))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.http_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--body", required=True, help="the JSON body of every request")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=0, help="in all; 0: until SIGTERM")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
