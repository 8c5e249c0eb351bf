"""The simple pipeline: an HTTP Frontend passes each request to Backend workers, which
stream back one line per word.

    .venv/bin/zroute serve examples/simple_pipeline.py:Frontend
    curl -X POST http://localhost:8000/generate -d '{"text": "world,universe,galaxy"}'

prints "Hello world!", "Hello universe!" and "Hello galaxy!", a second apart. With
`-f examples/config.yaml` the greeting is "Goodnight" and two Backend workers share the
requests.
"""

import asyncio

from zroute import BadRequest, api, depends, endpoint, service


@service  # one worker process unless Backend.ServiceArgs.workers says more
class Backend:
    # Annotated attributes with a default are the class's configuration: the YAML
    # section `Backend:` sets them, and so does `--Backend.greeting=Hi`.
    greeting: str = "Hello"
    sleep_time: float = 1.0  # seconds before each word

    @endpoint  # served by Backend's workers; the broker knows it as "Backend.generate"
    async def generate(self, text: str):
        # Each yield goes to the caller at once: one line per word, as it is made.
        for word in text.split(","):
            if self.sleep_time:  # 0: no pause at all, and the lines leave together
                await asyncio.sleep(self.sleep_time)  # never time.sleep: it blocks the worker
            yield f"{self.greeting} {word}!\n"


@service
class Frontend:
    # A client of Backend's endpoints, bound when zroute runs Frontend. The broker picks
    # a Backend worker for each call (Frontend.routing_mode, round robin by default).
    backend = depends(Backend)

    @api(path="/generate", method="POST")  # served over HTTP by zroute's gateway
    async def generate(self, request: dict):
        # `request` is the JSON body. Backend's lines pass through as they come.
        async for chunk in self.backend.generate(text_of(request)):
            yield chunk


def text_of(request: dict) -> str:
    """The body's "text"; BadRequest, which the HTTP client gets as a 400, without one."""
    text = request.get("text") if isinstance(request, dict) else None
    if not isinstance(text, str):
        raise BadRequest('the body must be JSON such as {"text": "a,b,c"}')
    return text
