"""Issue 14: signals, files, a full disk, interfaces that vanish, attaching ahead of others."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab, sh
from tests.support import tshark
from tests.support.pcapng_blocks import BT_EPB, BT_ISB, walk


def tc_show(lab: Lab, *what: str) -> str:
    return lab.run(lab.node, "tc", *what).stdout


def test_sighup_stops_cleanly(lab: Lab, keytap, tmp_path: Path) -> None:
    output = tmp_path / "hup.pcapng"
    capture = keytap("capture", "-i", lab.pod_veth, "--no-tls", "-o", str(output)).start()
    lab.run(lab.client, "ping", "-c", "2", "-i", "0.2", lab.pod_ip)
    assert capture.stop(signal.SIGHUP) == 0, capture.stderr
    blocks = walk(output.read_bytes())
    assert sum(b.type == BT_EPB for b in blocks) >= 4
    assert [b.type for b in blocks][-1] == BT_ISB
    assert "packets seen by the classifier" in capture.stderr
    assert "keytap" not in tc_show(lab, "filter", "show", "dev", lab.pod_veth, "ingress")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "keytap-test", str(mountpoint))
    try:
        yield mountpoint
    finally:
        sh("umount", str(mountpoint))


def test_disk_full_stops_cleanly_at_a_whole_block(lab: Lab, keytap, tmp_path: Path,
                                                  small_disk: Path) -> None:
    output, summary = small_disk / "full.pcapng", tmp_path / "summary.json"
    capture = keytap("capture", "-i", lab.pod_veth, "--no-tls", "-o", str(output),
                     "--summary-json", str(summary)).start()
    lab.run(lab.client, "ping", "-q", "-c", "100", "-i", "0.01", "-s", "30000", lab.pod_ip,
            check=False)
    assert capture.wait(timeout_s=30) == 4, capture.stderr
    assert "disk full" in capture.stderr and "Traceback" not in capture.stderr
    blocks = walk(output.read_bytes())  # whole blocks, to the last byte
    result = json.loads(summary.read_text())
    assert "disk full" in result["stopped_early"]
    packets = result["packets"]
    assert packets["seen"] == packets["written"] + packets["dropped"] > packets["written"] > 0
    assert sum(b.type == BT_EPB for b in blocks) == packets["written"]
    assert len(tshark.fields(output, "frame.number")) == packets["written"]
    assert "keytap" not in tc_show(lab, "filter", "show", "dev", lab.pod_veth, "ingress")
