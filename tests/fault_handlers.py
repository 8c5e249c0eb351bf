"""Handlers for the fault tests, loaded by workers with --handler tests.fault_handlers:NAME."""

import asyncio

MEBIBYTE = b"x" * (1 << 20)


async def flood(request):
    """40 MiB, one MiB every 50 ms."""
    for _ in range(40):
        yield MEBIBYTE
        await asyncio.sleep(0.05)


async def ticks(request):
    """A line every 0.1 s for 10 s."""
    for i in range(100):
        await asyncio.sleep(0.1)
        yield f"tick {i}\n"


async def yields_a_number(request):
    """A broken handler: chunks must be str or bytes."""
    yield 42
