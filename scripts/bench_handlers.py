"""Worker-side handlers of the benchmarks. Only the standard library: a worker that runs
another checkout's code (a benchmark's --tree) loads this file as it is.

make_handler, for scripts/bench_routing.py: a worker whose requests contend.

The default greeting handler waits with asyncio.sleep, so a worker runs any number of
requests side by side at no cost to each other: in-flight load costs no latency, and no
routing policy could matter. This handler models a worker with a fixed amount of compute:
each word holds the worker's one compute token for `Backend.sleep_time` seconds. The
token is an asyncio.Lock, which is FIFO, so the requests on one worker take turns word by
word: k requests in flight each advance at 1/k of the speed (processor sharing at word
granularity), and a worker finishes at most 1 / sleep_time words per second.

The token's time is kept on a clock of its own: a word that waited for the token starts
when the previous word ended, not when the event loop got round to waking it. Timer
overshoot and a busy host therefore delay chunks a little but do not make a worker
slower, so the offered load stays the load that bench_routing.py says it is.

    zroute worker --handler bench_handlers:make_handler --Backend.sleep_time=0.01
    (with this directory on PYTHONPATH; bench_routing.py sets it)

Body: {"text": "w,w,w"}; one "w\\n" chunk per word.

sized_reply (scripts/bench_memory.py) and large_reply (scripts/bench_gateway_limits.py)
are named by this file's path: `--handler scripts/bench_handlers.py:sized_reply`.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

REPLY_CHUNK = b"x" * (64 << 10)
REPLY_CHUNKS = 256  # 16 MiB


def make_handler(config: Any):
    word_time = config.backend.sleep_time
    compute = asyncio.Lock()  # one per worker process
    free_at = 0.0  # when the token's last word ends, on the event loop's clock

    async def contended(request: Any) -> AsyncIterator[str]:
        nonlocal free_at
        loop = asyncio.get_running_loop()
        for word in request["text"].split(","):
            wanted = loop.time()
            async with compute:
                free_at = max(wanted, free_at) + word_time
                await asyncio.sleep(max(0.0, free_at - loop.time()))
            yield word + "\n"

    return contended


async def sized_reply(request: Any) -> AsyncIterator[bytes]:
    """After `sleep` seconds, `chunks` chunks of `size` bytes."""
    await asyncio.sleep(request.get("sleep", 0))
    chunk = b"x" * request.get("size", 10)
    for n in range(request.get("chunks", 1)):
        yield chunk
        if n % 16 == 15:
            await asyncio.sleep(0)


async def large_reply(request: Any) -> AsyncIterator[bytes]:
    """16 MiB as fast as the worker can send it."""
    for _ in range(REPLY_CHUNKS):
        yield REPLY_CHUNK
        await asyncio.sleep(0)
