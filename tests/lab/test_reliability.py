"""Issue 14: signals, files, a full disk, interfaces that vanish, attaching ahead of others."""

from __future__ import annotations

import signal
from pathlib import Path

from keytap.demo.labnet import Lab
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
