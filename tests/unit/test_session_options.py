"""Issue 14, defect 11: --no-tls never holds a TLS flow waiting for keys that cannot come."""

from __future__ import annotations

import pytest

from keytap.events import PacketEvent
from keytap.session import Capture, CaptureOptions
from tests.unit.test_reorder import TLS_A, pkt


@pytest.mark.parametrize(("tls", "held"), [(True, 1), (False, 0)])
def test_no_tls_holds_no_flow(tls: bool, held: int) -> None:
    capture = Capture(CaptureOptions(interfaces=("kp1",), output="-", tls=tls), lambda: False)
    reorder = capture._reorder
    reorder.push_packet(pkt(0, TLS_A.hello()))
    out = reorder.pop_ready(int(100e6))  # past the 25 ms window, within --key-wait
    assert sum(isinstance(e, PacketEvent) for e in out) == 1 - held
    assert reorder.stats.packets_held == held
