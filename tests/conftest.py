"""Fixtures shared by the daemon tests."""

import pytest

from gateway.testing.daemon import Daemon
from gateway.testing.netns import topology


@pytest.fixture
def env(tmp_path):
    with topology() as topo:
        d = Daemon(str(tmp_path / "run"), str(tmp_path / "state")).start()
        try:
            yield topo, d
        finally:
            if d.proc.poll() is None:
                d.stop()
