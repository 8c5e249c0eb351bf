"""A service class's instance, run by a worker: its @on_start hooks before the worker
registers, its endpoints as the worker's handlers, its @on_stop hooks once it has drained.
A service with dependencies calls them through its own broker Client, open meanwhile."""

from __future__ import annotations

from zroute.client import Client
from zroute.services import Instance
from worker.runtime import Worker


class ServiceWorker:
    """Runs `instance` in `worker` (whose handlers are the instance's); `client` is the
    Client its dependencies call through, None if it has none."""

    def __init__(self, instance: Instance, worker: Worker, client: Client | None) -> None:
        self.instance = instance
        self.worker = worker
        self.client = client
        self._stopping = False

    async def run(self) -> None:
        """Start the instance, serve until stop(), drain, stop the instance. A start hook
        that raises ends it with StartFailed, before the worker registers."""
        if self.client is not None:
            self.client.connect()
        try:
            await self.instance.start()
            if not self._stopping:  # else a signal came while it started: nothing to drain
                await self.worker.run()
            await self.instance.stop()
        finally:
            if self.client is not None:
                await self.client.close()

    def stop(self) -> None:
        """Begin the drain (or, while the instance starts, skip serving)."""
        self._stopping = True
        self.worker.stop()
