"""Issue 2: keytap removes exactly what it added, also after being killed."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from tests import support
from tests.support import tshark

FOREIGN_FILTER = Path(support.__file__).with_name("foreign_filter.py")


@pytest.fixture(autouse=True)
def clsact_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """These are the clsact fallback's tests (older kernels); tcx links leave nothing."""
    monkeypatch.setenv("KEYTAP_ATTACH", "clsact")


def add_foreign_filter(lab: Lab, device: str, hook: str, prio: int) -> None:
    """A BPF filter on the node's clsact that keytap must leave alone."""
    lab.run(lab.node, "tc", "qdisc", "replace", "dev", device, "clsact")
    lab.run(lab.node, sys.executable, str(FOREIGN_FILTER), device, hook, str(prio))


def filters(lab: Lab, hook: str) -> str:
    return lab.run(lab.node, "tc", "filter", "show", "dev", lab.pod_veth, hook).stdout


def qdiscs(lab: Lab) -> str:
    return lab.run(lab.node, "tc", "qdisc", "show", "dev", lab.pod_veth).stdout


def test_foreign_clsact_and_filter_survive(lab: Lab, keytap, tmp_path: Path) -> None:
    add_foreign_filter(lab, lab.pod_veth, "ingress", 1)
    add_foreign_filter(lab, lab.pod_veth, "egress", 5)
    output = tmp_path / "c.pcapng"
    capture = keytap("capture", "-i", lab.pod_veth, "-o", str(output)).start()
    assert "keytap" in filters(lab, "ingress") and "keytap" in filters(lab, "egress")
    lab.run(lab.client, "ping", "-c", "2", "-i", "0.2", lab.pod_ip)
    assert capture.stop() == 0, capture.stderr

    # keytap ran ahead of (or beside) the foreign programs and saw both directions
    directions = tshark.fields(output, "frame.packet_flags_direction", display_filter="icmp")
    assert sorted(int(d, 16) for (d,) in directions) == [1, 1, 2, 2]
    assert "foreign_cilium" in filters(lab, "ingress")
    assert "foreign_cilium" in filters(lab, "egress")
    assert "keytap" not in filters(lab, "ingress") + filters(lab, "egress")
    assert "clsact" in qdiscs(lab)


def test_own_clsact_is_removed(lab: Lab, keytap, tmp_path: Path) -> None:
    capture = keytap("capture", "-i", lab.pod_veth, "-o", str(tmp_path / "c.pcapng")).start()
    assert "clsact" in qdiscs(lab)
    assert capture.stop(signal.SIGTERM) == 0, capture.stderr
    assert "clsact" not in qdiscs(lab)


def test_leftovers_of_a_killed_keytap_are_removed_at_next_start(
        lab: Lab, keytap, tmp_path: Path) -> None:
    add_foreign_filter(lab, lab.client_veth, "egress", 3)
    killed = keytap("capture", "-i", lab.pod_veth, "-i", lab.client_veth,
                    "-o", str(tmp_path / "killed.pcapng")).start()
    killed.stop(signal.SIGKILL)
    assert "keytap" in filters(lab, "ingress")

    again = keytap("capture", "-i", lab.pod_veth, "-o", str(tmp_path / "again.pcapng"),
                   "--duration", "1").start()
    assert again.wait() == 0, again.stderr
    assert "removed a filter left by a keytap that is gone" in again.stderr
    client_filters = lab.run(lab.node, "tc", "filter", "show", "dev", lab.client_veth,
                             "egress").stdout
    assert "keytap" not in filters(lab, "ingress") + filters(lab, "egress") + client_filters
    assert "foreign_cilium" in client_filters  # the foreign filter next to the stale one stays
    assert "clsact" not in qdiscs(lab)  # the killed keytap had created this one
