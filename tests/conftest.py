import pytest

from tests.support import Stack


@pytest.fixture
def stack(tmp_path):
    """A broker and workers on free ports; every process is stopped afterwards."""
    s = Stack(tmp_path)
    yield s
    s.close()
