#!/usr/bin/env python3
"""A minimal aiohttp server that streams the greeting reply: the baseline's backend.

    python scripts/plain_http_server.py PORT [SLEEP_TIME]

POST /generate {"text": "a,b"} streams "Hello a!\\n", "Hello b!\\n", one write per
line, as the zroute worker's greeting handler does.
"""

import asyncio
import sys

import orjson
from aiohttp import web


def make_app(sleep_time: float) -> web.Application:
    async def generate(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            for word in body["text"].split(","):
                if sleep_time:
                    await asyncio.sleep(sleep_time)
                await response.write(f"Hello {word.strip()}!\n".encode())
            await response.write_eof()
        except ConnectionResetError:
            pass  # the load generator closed the connection at the end of its run
        return response

    app = web.Application()
    app.router.add_post("/generate", generate)
    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    sleep_time = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    web.run_app(make_app(sleep_time), host="127.0.0.1", port=port, access_log=None, print=None)
