"""Headless Chromium for tests, driven over its DevTools protocol (a websocket, with
aiohttp's client): open a page, evaluate JavaScript in it, take a screenshot.

Chromium comes from Debian's `chromium` package (.ci/run installs it where it is
missing); `unavailable()` says why a test cannot use it here.
"""

from __future__ import annotations

import base64
import itertools
import shutil
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import Proc, async_wait_until

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
START_TIMEOUT_S = 30.0
# Root needs --no-sandbox; the rest keeps a closed network quiet and the start quick.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1400,1100",
         "--remote-debugging-port=0")


class BrowserUnavailable(Exception):
    """Chromium is not installed, or does not start here; the message says which."""


class Browser:
    """One Chromium process with one page, its DevTools session open."""

    def __init__(self, proc: Proc, session: aiohttp.ClientSession,
                 socket: aiohttp.ClientWebSocketResponse) -> None:
        self.proc = proc
        self.session = session
        self.socket = socket
        self.ids = itertools.count(1)

    @classmethod
    async def open(cls, url: str, work_dir: Path) -> Browser:
        """Chromium showing `url`, its profile and log in `work_dir`."""
        if CHROMIUM is None:
            raise BrowserUnavailable("Chromium is not installed (Debian's package "
                                     "`chromium`; .ci/run installs it)")
        profile = work_dir / "chromium-profile"
        profile.mkdir()
        proc = Proc("chromium", [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                    work_dir)
        proc.expect(None)  # however it ends: only the page is under test
        session = aiohttp.ClientSession()
        try:
            # Chromium writes the port it chose into the profile once it listens.
            port_file = profile / "DevToolsActivePort"
            try:
                await async_wait_until(lambda: port_file.exists() or not proc.alive,
                                       START_TIMEOUT_S, "Chromium's DevTools port")
            except AssertionError:
                pass
            if not port_file.exists():
                raise BrowserUnavailable("Chromium did not start here: "
                                         + proc.output()[-2000:].strip())
            port = port_file.read_text().split()[0]
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(t for t in targets if t["type"] == "page")
            socket = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        except BaseException:
            await session.close()
            proc.stop()
            raise
        browser = cls(proc, session, socket)
        await browser.call("Page.navigate", url=url)
        return browser

    async def call(self, method: str, **params: Any) -> dict:
        """One DevTools command; its result. The events in between are not needed."""
        command_id = next(self.ids)
        await self.socket.send_json({"id": command_id, "method": method, "params": params})
        async for message in self.socket:
            reply = message.json()
            if reply.get("id") == command_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise RuntimeError(f"{method}: Chromium closed the DevTools connection")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-like values only), that
        of its promise if it gives one."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        result = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    async def close(self) -> None:
        await self.socket.close()
        await self.session.close()
        self.proc.stop()
