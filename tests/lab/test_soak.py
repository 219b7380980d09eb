"""Issue 14: a minute of mixed load (bulk TCP, small UDP, a new HTTPS connection every 0.1 s):
keytap's anonymous memory and open fds do not grow once warm, the accounting is exact, and
every HTTPS session has its keys. tools/soak.py runs the same for 10 minutes, on demand."""

from __future__ import annotations

import json
from pathlib import Path

from keytap.demo.labnet import Lab
from tests.support import soak
from tests.support.tls_lab import read_keylog

SECONDS = 60
MIB = 1024


def test_a_minute_of_mixed_load(lab: Lab, keytap, tmp_path: Path) -> None:
    soak.start_servers(lab, tmp_path)
    capture, summary = tmp_path / "c.pcapng", tmp_path / "summary.json"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--keylog-file",
                     str(tmp_path / "keys"), "--summary-json", str(summary)).start()
    assert process.process is not None
    result = soak.run_load(lab, tmp_path, process.process.pid, SECONDS, interval_s=2)
    assert process.stop() == 0, process.stderr

    report = json.loads(summary.read_text())
    packets = report["packets"]
    assert packets["seen"] == packets["written"] + packets["dropped"] + packets["filtered"]
    for interface in report["interfaces"]:
        assert interface["seen"] == (interface["written"] + interface["dropped"]
                                     + interface["filtered"])
    assert packets["dropped"] == 0, packets
    assert result.connections >= SECONDS * 3  # the premise: the HTTPS load ran
    tls = report["tls"]
    assert tls["sessions_seen"] == tls["sessions_with_keys"] == result.connections
    assert read_keylog(tmp_path / "keys") == read_keylog(tmp_path / "client.keys")

    assert result.growth_kb("rss_anon_kb", after_fraction=0.3) <= 8 * MIB, result.samples
    assert result.growth_kb("fds", after_fraction=0.1) == 0, result.samples
