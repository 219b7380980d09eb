"""Many TLS library files (every wheel's libssl, copies in temporary directories) need many
uprobes, an fd each: keytap lifts its fd limit to the hard limit, and gives `-- CMD` the one it
was started with."""

from __future__ import annotations

import resource

import pytest

from keytap.kernel import loader


@pytest.fixture
def limits() -> None:
    """The process's fd limit is put back after the test."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_the_fd_limit_is_raised_to_its_hard_limit(limits) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    loader.allow_many_probes()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard


def test_the_command_gets_the_limit_keytap_started_with(limits) -> None:
    loader.allow_many_probes()
    loader.restore_fd_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == loader.NOFILE_AT_START
