"""Lab layer: root, BCC, kernel headers, network namespaces, tcpdump and tshark.

These tests must not be skipped where they are expected to run (CI, before resolving an issue):
a missing tool fails them with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab, remove_stale_labs
from tests.support.runner import KeytapProcess


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session", autouse=True)
def lab_requirements() -> None:
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (BPF, TC, network namespaces): run them with sudo")
    for tool in ("tshark", "tcpdump", "ip", "tc", "curl", "openssl"):
        if shutil.which(tool) is None:
            pytest.fail(f"lab tests need {tool}: run tools/setup")
    probe = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True)
    if probe.returncode != 0:
        pytest.fail("lab tests need BCC (python3-bpfcc) importable: run tools/setup")
    remove_stale_labs()


@pytest.fixture
def lab() -> Iterator[Lab]:
    network = Lab().create()
    try:
        yield network
    finally:
        network.destroy()


@pytest.fixture(autouse=True)
def own_layout_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's keytap remembers proven layouts in its own directory: what one test
    proved must not decide another."""
    monkeypatch.setenv("KEYTAP_CACHE_DIR", str(tmp_path / "keytap-cache"))


@pytest.fixture
def keytap(lab: Lab, tmp_path: Path) -> Iterator[type[KeytapProcess]]:
    """Start keytap in the lab's node namespace: keytap(lab_args...).start()."""
    started: list[KeytapProcess] = []

    def factory(*args: str, ns: str | None = None,
                prefix: tuple[str, ...] = ()) -> KeytapProcess:
        process = KeytapProcess(lab, ns or lab.node, args, prefix)
        started.append(process)
        return process

    yield factory
    for process in started:
        process.kill()
