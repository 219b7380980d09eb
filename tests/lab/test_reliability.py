"""Issue 14: signals, files, a full disk, interfaces that vanish, attaching ahead of others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab, sh
from tests import support
from tests.support import tshark
from tests.support.pcapng_blocks import BT_EPB, BT_ISB, walk

FOREIGN_TCX = Path(support.__file__).with_name("foreign_tcx.py")


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


def icmp_directions(capture: Path) -> list[int]:
    """Direction of each ICMP packet on the first interface (1 in, 2 out)."""
    rows = tshark.fields(capture, "frame.packet_flags_direction",
                         display_filter="icmp && frame.interface_id == 0")
    return sorted(int(d, 16) for (d,) in rows)


def test_tcx_first_sees_what_a_redirect_and_a_terminal_filter_hide(
        lab: Lab, keytap, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 3: a Cilium-like tcx program redirecting the pod's packets away, and a
    `u32 ... flowid` filter at prio 1 on clsact; keytap's tcx link runs ahead of both."""
    lab.run(lab.node, "tc", "qdisc", "add", "dev", lab.pod_veth, "clsact")
    lab.run(lab.node, "tc", "filter", "add", "dev", lab.pod_veth, "ingress", "prio", "1",
            "protocol", "all", "u32", "match", "u32", "0", "0", "flowid", "1:1")
    foreign = lab.spawn(lab.node, sys.executable, str(FOREIGN_TCX), lab.pod_veth,
                        lab.client_veth, stdout=subprocess.PIPE, text=True)
    assert foreign.stdout is not None and foreign.stdout.readline() == "attached\n"
    output = tmp_path / "tcx.pcapng"
    capture = keytap("capture", "-i", lab.pod_veth, "--no-tls", "-o", str(output)).start()
    lab.run(lab.pod, "ping", "-c", "3", "-i", "0.2", lab.client_ip)  # through the redirect
    assert capture.stop() == 0, capture.stderr
    assert icmp_directions(output) == [1, 1, 1, 2, 2, 2]
    assert "WARNING" not in capture.stderr

    # the clsact fallback cannot get ahead of either: it says so, loudly
    fallback = tmp_path / "clsact.pcapng"
    monkeypatch.setenv("KEYTAP_ATTACH", "clsact")
    capture = keytap("capture", "-i", lab.pod_veth, "--no-tls", "-o", str(fallback)).start()
    lab.run(lab.pod, "ping", "-c", "3", "-i", "0.2", lab.client_ip)
    assert capture.stop() == 0, capture.stderr
    assert f"WARNING: {lab.pod_veth} ingress: a u32 filter at prio 1" in capture.stderr
    assert 1 not in icmp_directions(fallback)  # blind on ingress, as warned
    assert "flowid 1:1" in tc_show(lab, "filter", "show", "dev", lab.pod_veth, "ingress")
    assert "keytap" not in tc_show(lab, "filter", "show", "dev", lab.pod_veth, "ingress")


@pytest.mark.parametrize("attach", ["tcx", "clsact"])
def test_vanished_interfaces(lab: Lab, keytap, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, attach: str) -> None:
    """Defect 5: a deleted veth is noticed within a second, the others are still captured,
    and when none is left keytap ends (exit 5) with its summary and statistics blocks."""
    monkeypatch.setenv("KEYTAP_ATTACH", attach)
    output, summary = tmp_path / "gone.pcapng", tmp_path / "summary.json"
    capture = keytap("capture", "-i", lab.client_veth, "-i", lab.pod_veth, "--no-tls",
                     "-o", str(output), "--summary-json", str(summary)).start()
    lab.run(lab.node, "ip", "link", "del", lab.client_veth)
    capture.wait_for(f"{lab.client_veth}: the interface was deleted; capturing "
                     f"{lab.pod_veth}", timeout_s=1.5)
    lab.run(lab.node, "ping", "-c", "2", "-i", "0.2", lab.pod_ip)
    lab.run(lab.node, "ip", "link", "del", lab.pod_veth)
    assert capture.wait(timeout_s=5) == 5, capture.stderr
    assert "nothing left to capture" in capture.stderr and "Traceback" not in capture.stderr
    blocks = walk(output.read_bytes())
    assert [b.type for b in blocks].count(BT_ISB) == 2
    result = json.loads(summary.read_text())
    assert [i["lost"] for i in result["interfaces"]] == ["the interface was deleted"] * 2
    assert result["packets"]["written"] >= 4
    assert result["packets"]["seen"] == result["packets"]["written"] + result["packets"]["dropped"]


def test_a_clsact_deleted_under_keytap(lab: Lab, keytap, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYTAP_ATTACH", "clsact")
    output = tmp_path / "qdisc.pcapng"
    capture = keytap("capture", "-i", lab.pod_veth, "-i", lab.client_veth, "--no-tls",
                     "-o", str(output)).start()
    lab.run(lab.node, "tc", "qdisc", "del", "dev", lab.pod_veth, "clsact")
    capture.wait_for(f"{lab.pod_veth}: keytap's filters were removed", timeout_s=1.5)
    lab.run(lab.client, "ping", "-c", "2", "-i", "0.2", lab.client_gw)
    assert capture.stop() == 0, capture.stderr
    assert "Traceback" not in capture.stderr
    assert [b.type for b in walk(output.read_bytes())].count(BT_ISB) == 2
    assert "keytap" not in tc_show(lab, "filter", "show", "dev", lab.client_veth, "ingress")
    assert "clsact" not in tc_show(lab, "qdisc", "show", "dev", lab.client_veth)


def test_a_live_keytap_in_another_pid_namespace_keeps_its_filters(
        lab: Lab, keytap, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 4: a keytap in a container (own PID namespace, pid 1 there) is alive; the stale
    cleanup of another keytap must not take its filters."""
    monkeypatch.setenv("KEYTAP_ATTACH", "clsact")
    inside = tmp_path / "inside.pcapng"
    contained = keytap("capture", "-i", lab.pod_veth, "--no-tls", "-o", str(inside),
                       prefix=("unshare", "--pid", "--fork", "--mount-proc")).start()
    other = keytap("capture", "-i", lab.client_veth, "--no-tls", "--duration", "0.5",
                   "-o", str(tmp_path / "other.pcapng")).start()
    assert other.wait() == 0, other.stderr
    assert "removed a filter" not in other.stderr
    assert "keytap" in tc_show(lab, "filter", "show", "dev", lab.pod_veth, "ingress")
    lab.run(lab.client, "ping", "-c", "2", "-i", "0.2", lab.pod_ip)
    assert contained.process is not None
    os.killpg(contained.process.pid, signal.SIGINT)  # unshare waits; keytap is its child
    assert contained.wait() == 0, contained.stderr
    assert icmp_directions(inside) == [1, 1, 2, 2]
    assert "clsact" not in tc_show(lab, "qdisc", "show", "dev", lab.pod_veth)


def test_a_reader_that_leaves_costs_no_packet_in_the_accounting(
        lab: Lab, keytap, tmp_path: Path) -> None:
    """Defect 11: with `-o -`, packets not written when the reader leaves count as dropped."""
    summary = tmp_path / "summary.json"
    capture = keytap("capture", "-i", lab.pod_veth, "--no-tls", "-o", "-",
                     "--summary-json", str(summary)).start(stdout=subprocess.PIPE)
    assert capture.process is not None and capture.process.stdout is not None
    assert os.read(capture.process.stdout.fileno(), 64)  # the header arrived
    lab.run(lab.client, "ping", "-q", "-c", "200", "-i", "0.002", "-s", "1400", lab.pod_ip)
    capture.process.stdout.close()  # like `| head -c 64`
    lab.run(lab.client, "ping", "-q", "-c", "20", "-i", "0.01", lab.pod_ip)
    assert capture.wait(timeout_s=10) == 0, capture.stderr
    assert "output closed by the reader" in capture.stderr
    result = json.loads(summary.read_text())
    packets, interface = result["packets"], result["interfaces"][0]
    assert packets["seen"] == packets["written"] + packets["dropped"] >= 400
    assert interface["unwritten"] > 0 and interface["kernel_dropped"] == 0
