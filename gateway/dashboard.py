"""GET /dashboard: one page that shows the balancer live, fed by GET /stats/stream.

The page is static/dashboard.html with static/dashboard.css and static/dashboard.js
inlined into it: one response, nothing fetched from elsewhere. Its
Content-Security-Policy runs that script and that style only (by their hashes) and lets
the page connect to its own origin only: a worker id or any other name a peer chose can
never run as code there, even if it were written into the page as markup.
"""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files
from typing import Awaitable, Callable, Mapping

from aiohttp import web

STATIC = files("gateway") / "static"


def csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def page() -> tuple[bytes, dict[str, str]]:
    """The page and its headers."""
    style = (STATIC / "dashboard.css").read_text()
    script = (STATIC / "dashboard.js").read_text()
    html = ((STATIC / "dashboard.html").read_text()
            .replace("/*STYLE*/", style).replace("/*SCRIPT*/", script))
    policy = (f"default-src 'none'; script-src {csp_hash(script)}; "
              f"style-src {csp_hash(style)}; connect-src 'self'; img-src data:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    headers = {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache",
               "Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer"}
    return html.encode(), headers


def page_handler(server_headers: Mapping[str, str]
                 ) -> Callable[[web.BaseRequest], Awaitable[web.Response]]:
    """The handler of GET /dashboard; it builds the page now, once."""
    body, headers = page()
    headers = {**server_headers, **headers}

    async def dashboard(_: web.BaseRequest) -> web.Response:
        return web.Response(body=body, headers=headers)

    return dashboard
