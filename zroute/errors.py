"""Exceptions shared by the components and the code they run.

BadRequest is what a handler raises for a request it cannot serve, wherever it runs: a
worker's handler, or a gateway's own route (gateway/routes.py's Call). Each side turns
it into the same error for the client: `bad_request`, a 400 over HTTP."""

from __future__ import annotations


class BadRequest(Exception):
    """Raised by a handler for input it cannot serve; the client gets bad_request."""


class StartFailed(Exception):
    """A component's own start-up code (a service's @on_start hook, a gateway's on_start)
    failed: the command ends with this one line and exit code 3, before it serves, and
    `zroute serve` stops rather than restart it."""
