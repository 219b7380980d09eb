"""Many TLS library files (every wheel's libssl, copies in temporary directories) need more
uprobes than BCC's own quota of 1000: keytap lifts it to what the fd limit allows."""

from __future__ import annotations

import resource

import pytest

from keytap.kernel import loader


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's fd limit is put back after the test; the environment too."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    monkeypatch.delenv("BCC_PROBE_LIMIT", raising=False)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_the_quota_follows_the_fd_limit_raised_to_its_hard_limit(limits) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    loader.allow_many_probes()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    expected = max(hard - loader.FD_RESERVE, loader.DEFAULT_PROBE_LIMIT)
    assert int(loader.os.environ["BCC_PROBE_LIMIT"]) == expected


def test_a_quota_the_user_set_is_kept(limits, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCC_PROBE_LIMIT", "50")
    loader.allow_many_probes()
    assert loader.os.environ["BCC_PROBE_LIMIT"] == "50"
