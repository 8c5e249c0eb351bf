import pytest
from hypothesis import HealthCheck, Phase, settings

from tests import hosts
from tests.support import Stack

# For scripts/mutation.sh (pytest --hypothesis-profile=mutation): a failing example ends
# the test at once, unshrunk, and nothing is kept between runs of different mutants.
settings.register_profile("mutation", phases=[Phase.explicit, Phase.generate], database=None,
                          suppress_health_check=[HealthCheck.too_slow])


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
