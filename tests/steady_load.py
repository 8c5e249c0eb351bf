"""Steady background load for tests: `python -m tests.steady_load ADDRESS RATE`.

Sends the seed request at RATE requests/s until its stdin closes, then prints one JSON
line: how many requests completed, and the codes of those that failed.
"""

from __future__ import annotations

import asyncio
import sys

import orjson

from zroute.client import BrokerError, Client

SEED = {"text": "world,universe,galaxy"}
SEED_REPLY = b"Hello world!\nHello universe!\nHello galaxy!\n"


async def one(client: Client, outcomes: dict) -> None:
    try:
        reply = await client.round_robin("generate", SEED).read()
    except BrokerError as e:
        outcomes["failed"].append(e.code)
    else:
        key = "completed" if reply == SEED_REPLY else "wrong"
        outcomes[key] += 1


async def main(address: str, rate: float) -> None:
    outcomes = {"completed": 0, "wrong": 0, "failed": []}
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    tasks = []
    async with Client(address, timeout=10) as client:
        print("running", flush=True)
        while not stdin_closed.done():
            tasks.append(asyncio.create_task(one(client, outcomes)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    print(orjson.dumps(outcomes).decode(), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
