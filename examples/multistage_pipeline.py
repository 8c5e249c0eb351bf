"""A pipeline of three stages: Frontend -> Middle -> Backend. Middle numbers each line of
Backend's stream as it arrives, and passes it on at once.

    .venv/bin/zroute serve examples/multistage_pipeline.py:Frontend
    curl -N -X POST http://localhost:8000/generate -d '{"text": "world,universe,galaxy"}'

gives "1. Hello world!", "2. Hello universe!", "3. Hello galaxy!", each as Backend makes
it. Middle runs in two worker processes (Middle.ServiceArgs.workers), Backend in one.

A Middle worker that dies before it has sent anything is replaced by the other one (the
broker retries the request there); one that dies mid-stream ends the HTTP stream with a
visible error, never a short reply that looks complete.
"""

from simple_pipeline import Backend, text_of  # the simple pipeline's Backend, one worker
from zroute import api, depends, endpoint, service


@service(workers=2)  # the default of Middle.ServiceArgs.workers
class Middle:
    backend = depends(Backend)

    @endpoint
    async def generate(self, text: str):
        # Each chunk is transformed and yielded as soon as it arrives, not once Backend
        # has finished: the stream flows through every stage.
        number = 0
        async for line in self.backend.generate(text):
            number += 1
            yield f"{number}. {line}"


@service
class Frontend:
    middle = depends(Middle)

    @api(path="/generate", method="POST")
    async def generate(self, request: dict):
        async for chunk in self.middle.generate(text_of(request)):
            yield chunk
