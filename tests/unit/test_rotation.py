"""Rotation (-C, -G, -W): tcpdump's file names, the ring, and files that stand on their own."""

from __future__ import annotations

import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest

from keytap.errors import KeytapError
from keytap.events import Direction, KeyEvent, PacketEvent
from keytap.report import CaptureStats, InterfaceStats
from keytap.sink.capture_file import CaptureFile
from keytap.sink.files import PendingFile
from keytap.sink.open_sessions import OpenSessions
from keytap.sink.rotation import Rotation, RotationRule
from tests.support.pcapng_blocks import BT_DSB, BT_EPB, BT_IDB, BT_ISB, BT_SHB, walk
from tests.unit.test_reorder import TLS_A, TLS_B, pkt, tcp_frame

T0 = time.mktime((2026, 12, 2, 3, 4, 5, 0, 0, -1))


def fin(flow, reply: bool = False) -> bytes:
    return tcp_frame(flow.sport, flow.dport, reply=reply, flags="FA")


def segment(flow, size: int) -> bytes:
    return tcp_frame(flow.sport, flow.dport, bytes(size))


def names(rule: RotationRule, steps: list[float]) -> list[str | None]:
    rotation = Rotation(rule, T0)
    return [rotation.name] + [rotation.advance(T0 + step) for step in steps]


def test_size_rotation_numbers_files_as_tcpdump() -> None:
    assert names(RotationRule("c.pcapng", size_bytes=10), [0, 0, 0]) == [
        "c.pcapng", "c.pcapng1", "c.pcapng2", "c.pcapng3"]


def test_size_rotation_with_w_is_a_zero_padded_ring() -> None:
    assert names(RotationRule("c", size_bytes=10, count=3), [0] * 4) == [
        "c0", "c1", "c2", "c0", "c1"]
    assert names(RotationRule("c", size_bytes=10, count=11), [0])[:2] == ["c00", "c01"]


def test_time_rotation_expands_strftime_and_stops_after_w_files() -> None:
    rule = RotationRule("c-%H%M%S.pcapng", seconds=60, count=3)
    rotation = Rotation(rule, T0)
    assert rotation.name == "c-030405.pcapng"
    assert not rotation.expired(T0 + 59.9) and rotation.expired(T0 + 60)
    assert rotation.advance(T0 + 60) == "c-030505.pcapng"
    assert rotation.advance(T0 + 120) == "c-030605.pcapng"
    assert rotation.advance(T0 + 180) is None  # three files: done


def test_time_and_size_number_within_each_period() -> None:
    rotation = Rotation(RotationRule("c-%M", size_bytes=10, seconds=60), T0)
    assert [rotation.name, rotation.advance(T0 + 1), rotation.advance(T0 + 61),
            rotation.advance(T0 + 62)] == ["c-04", "c-041", "c-05", "c-051"]
    assert rotation.full(11) and not rotation.full(10)


def test_open_sessions_carry_secrets_until_both_fins_or_a_reset() -> None:
    sessions = OpenSessions()
    sessions.secrets(TLS_A.random, b"dsb-a")
    sessions.secrets(TLS_B.random, b"dsb-b")
    sessions.packet(TLS_A.hello())
    sessions.packet(TLS_B.hello())
    assert sessions.blocks() == [b"dsb-a", b"dsb-b"]
    sessions.packet(fin(TLS_A))
    assert sessions.blocks() == [b"dsb-a", b"dsb-b"]  # half closed: the other side may talk
    sessions.packet(fin(TLS_A, reply=True))
    sessions.packet(tcp_frame(TLS_B.sport, TLS_B.dport, flags="R"))
    assert sessions.blocks() == []


def keys(session) -> KeyEvent:
    line = f"CLIENT_RANDOM {session.random.hex()} {'02' * 48}"
    return KeyEvent(0, session.random, (line,), slot=0)


def test_rotated_files_each_stand_on_their_own(tmp_path: Path) -> None:
    rotation = Rotation(RotationRule(str(tmp_path / "c"), size_bytes=3000, count=3), time.time())
    stats = CaptureStats([InterfaceStats("kp1", 7)])
    interface = stats.interfaces[0]
    sink = CaptureFile(PendingFile(rotation.name), stats, 262144, False, None, None,
                       application="t", os_name="", rotation=rotation)
    sink.write([keys(TLS_A), pkt(1, TLS_A.hello(), ifindex=7)])
    for n in range(12):  # 1000-byte segments of the open session: four files' worth
        sink.write([pkt(2 + n, segment(TLS_A, 1000), ifindex=7)])
    sink.write([pkt(20, fin(TLS_A), ifindex=7), pkt(21, fin(TLS_A, reply=True), ifindex=7)])
    assert [p.name for p in tmp_path.iterdir()
            if p.name.startswith(".")] != []  # the last file is not in place yet
    interface.seen_out = interface.written  # what the kernel would have counted
    sink.finish()
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0", "c1", "c2"]  # the ring
    assert sink.files == [str(tmp_path / n) for n in ("c0", "c1", "c2")]
    delivered = 0
    for path in sorted(tmp_path.iterdir()):
        assert path.stat().st_mode & 0o777 == 0o600
        blocks = walk(path.read_bytes())
        kinds = [b.type for b in blocks]
        assert kinds[:3] == [BT_SHB, BT_IDB, BT_DSB]  # the session's keys ahead of its packets
        assert kinds[-1] == BT_ISB
        isb = blocks[-1].body
        options = dict(_options(isb[12:]))
        packets = kinds.count(BT_EPB)
        assert struct.unpack("<Q", options[8])[0] == packets  # isb_usrdeliv: this file's
        assert struct.unpack("<Q", options[4])[0] == packets  # isb_ifrecv too
        delivered += packets
    assert delivered <= interface.written  # the ring overwrote the oldest files


def _options(raw: bytes):
    offset = 0
    while offset + 4 <= len(raw):
        code, length = struct.unpack_from("<HH", raw, offset)
        if code == 0:
            return
        yield code, raw[offset + 4: offset + 4 + length]
        offset += 4 + length + (-length % 4)


def test_w_with_g_stops_and_discards_after_the_last_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    rotation = Rotation(RotationRule(str(tmp_path / "g%S"), seconds=1, count=2), clock[0])
    stats = CaptureStats([InterfaceStats("kp1", 7)])
    sink = CaptureFile(PendingFile(rotation.name), stats, 262144, False, None, None,
                       application="t", os_name="", rotation=rotation)
    for second in range(4):
        sink.write([pkt(second, TLS_A.data(), ifindex=7)])
        clock[0] += 1
    assert sink.count_reached()
    stats.interfaces[0].seen_out = 4
    sink.finish()
    sink.close()
    assert len(list(tmp_path.iterdir())) == 2
    assert (stats.interfaces[0].written, stats.interfaces[0].discarded) == (2, 2)


def test_packets_of_a_new_interface_get_its_idb_in_the_next_file_too(tmp_path: Path) -> None:
    rotation = Rotation(RotationRule(str(tmp_path / "c"), size_bytes=500), time.time())
    stats = CaptureStats([InterfaceStats("kp1", 7)])
    sink = CaptureFile(PendingFile(rotation.name), stats, 262144, False, None, None,
                       application="t", os_name="", rotation=rotation)
    stats.interfaces.append(InterfaceStats("kp2", 8))
    sink.add_interface(stats.interfaces[1])
    sink.write([PacketEvent(n, 8, Direction.INBOUND, 400, bytes(400)) for n in range(3)])
    stats.interfaces[1].seen_in = 3
    sink.finish()
    sink.close()
    for path in (tmp_path / "c", tmp_path / "c1"):
        kinds = [b.type for b in walk(path.read_bytes())]
        assert BT_IDB in kinds and BT_EPB in kinds


def test_late_keys_go_first_in_their_rotated_file_and_are_carried(tmp_path: Path) -> None:
    rotation = Rotation(RotationRule(str(tmp_path / "c"), size_bytes=2500), time.time())
    stats = CaptureStats([InterfaceStats("kp1", 7)])
    sink = CaptureFile(PendingFile(rotation.name), stats, 262144, False, None, None,
                       application="t", os_name="", rotation=rotation)
    sink.write([pkt(1, TLS_A.hello(), ifindex=7)])  # no keys yet
    sink.write([pkt(2 + n, segment(TLS_A, 1000), ifindex=7) for n in range(3)])  # cut after
    sink.write([replace(keys(TLS_A), late=True), pkt(9, segment(TLS_A, 10), ifindex=7)])
    stats.interfaces[0].seen_out = stats.interfaces[0].written
    sink.finish()
    sink.close()
    assert sink.sessions_rescued == 1
    first = [b.type for b in walk((tmp_path / "c").read_bytes())]
    assert first[:4] == [BT_SHB, BT_IDB, BT_DSB, BT_EPB]  # put ahead of the ClientHello
    second = [b.type for b in walk((tmp_path / "c1").read_bytes())]
    assert second[:4] == [BT_SHB, BT_IDB, BT_DSB, BT_EPB]  # the open session's, carried


def test_rotation_never_renames_over_a_device() -> None:
    with pytest.raises(KeytapError, match="not a regular file"):
        PendingFile("/dev/null")
