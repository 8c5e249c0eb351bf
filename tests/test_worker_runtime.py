"""The worker runtime as a handler's author and an operator see it: its log lines, and
what it does when its event loop blocks or its broker goes. Real processes throughout."""

from __future__ import annotations

import re

import pytest

from tests.http_support import http, start_gateway, wait_healthy
from tests.support import Stack


@pytest.mark.timeout(60)
def test_the_worker_logs_a_request_under_the_id_the_gateway_logs(stack: Stack):
    stack.broker()
    worker = stack.worker("w1")
    gateway = start_gateway(stack)
    wait_healthy(gateway, 1)
    for text in ("a", "b", "c"):
        assert http("POST", f"{gateway.url}/generate", b'{"text": "%s"}' % text.encode()).status == 200

    gateway_ids = re.findall(r"INFO request=(\S+) policy=", gateway.proc.output())
    served = re.findall(r"INFO worker=w1 request=(\S+) client=([0-9a-f]+) chunks=1 ", worker.output())
    assert len(gateway_ids) == 3 and [rid for rid, _ in served] == gateway_ids
    assert len({client for _, client in served}) == 1  # one gateway, one client id
