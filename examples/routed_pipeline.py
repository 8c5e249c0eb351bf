"""The routed pipeline: the simple pipeline's Backend, and a Frontend that chooses how
each request is routed to it.

    .venv/bin/zroute serve examples/routed_pipeline.py:Frontend -f examples/config.yaml

- POST /generate {"text": "sun,moon"}: routed by Frontend.routing_mode, "round_robin"
  (Backend-1, Backend-2, Backend-1, ...) or "random";
- POST /generate {"text": "sun,moon", "worker": "Backend-2"}: straight to that worker
  (a direct call);
- POST /generate/best {"text": "sun,moon"}: to the worker that select_best_worker picks
  from the live workers and their load, with a direct call too.

Each worker logs a line per request it serves, so the routing shows in the log.
"""

import logging

from simple_pipeline import Backend, text_of  # the same Backend: a file beside this one
from zroute import api, depends, on_start, service

log = logging.getLogger("routed_pipeline")


@service
class Frontend:
    backend = depends(Backend)
    # Frontend.routing_mode in the config. A call without a policy of its own would use
    # it anyway; here the start hook turns it into the call to make, once.
    routing_mode: str = "round_robin"

    @on_start  # runs in the gateway's process before it takes requests
    async def choose_routing(self):
        policies = {"round_robin": self.backend.generate.round_robin,
                    "random": self.backend.generate.random}
        if self.routing_mode not in policies:  # stops `zroute serve` with this one line
            raise ValueError(f"Frontend.routing_mode must be one of {', '.join(policies)}, "
                             f"not {self.routing_mode!r}")
        self.routed_call = policies[self.routing_mode]
        log.info("Frontend routes to Backend by %s", self.routing_mode)

    @api(path="/generate", method="POST")
    async def generate(self, request: dict):
        text, worker = text_of(request), request.get("worker")
        if worker:  # the caller named a worker: a direct call, never another worker
            chunks = self.backend.generate.direct(text, worker)
        else:
            chunks = self.routed_call(text)
        async for chunk in chunks:
            yield chunk

    @api(path="/generate/best", method="POST")
    async def generate_on_best_worker(self, request: dict):
        worker = await self.select_best_worker()
        async for chunk in self.backend.generate.direct(text_of(request), worker):
            yield chunk

    async def select_best_worker(self) -> str:
        """The live Backend worker with the fewest requests in flight for its capacity
        (the first by id among equals)."""
        workers = await self.backend.workers()  # each with .inflight, .capacity, .load ...
        if not workers:
            raise LookupError("no Backend worker is registered")
        return min(workers, key=lambda w: (w.load, w.id)).id
