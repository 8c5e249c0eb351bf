import pytest

from tests import hosts
from tests.support import Stack


@pytest.fixture
def stack(tmp_path):
    """A broker and workers on free ports; every process is stopped afterwards."""
    s = Stack(tmp_path)
    yield s
    s.close()


@pytest.fixture(scope="module")
def network(request, tmp_path_factory):
    """The test module's HOSTS hosts, made of network namespaces (tests/hosts.py); every
    process on them is stopped and every namespace deleted afterwards. Skipped where
    network namespaces cannot be made."""
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    hosts.remove_stale()
    with hosts.Network(request.module.HOSTS, tmp_path_factory.mktemp("network")) as net:
        yield net
