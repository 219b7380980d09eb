"""sink.rescue: late DSBs put right after the header, atomically, or not at all."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from keytap.events import Direction
from keytap.sink.pcapng import InterfaceDescription, PcapngWriter, secrets_block
from keytap.sink.rescue import put_secrets_first
from tests.support.pcapng_blocks import BT_DSB, BT_EPB, BT_IDB, BT_SHB, walk

LINE = b"CLIENT_RANDOM " + b"00" * 32 + b" " + b"11" * 48 + b"\n"


def capture_with_late_keys(path: Path) -> int:
    stream = io.BytesIO()
    writer = PcapngWriter(stream, [InterfaceDescription("eth0", "test", 65535)],
                          application="test", os_name="")
    writer.write_packet(0, 1, b"\x00" * 60, 60, Direction.INBOUND)
    writer.write_secrets(LINE)  # too late where it is
    path.write_bytes(stream.getvalue())
    os.chmod(path, 0o600)
    return writer.header_size


def test_late_keys_come_right_after_the_header(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    header = capture_with_late_keys(path)
    before = path.read_bytes()
    put_secrets_first(path, header, secrets_block(LINE))
    after = path.read_bytes()
    assert [b.type for b in walk(after)] == [BT_SHB, BT_IDB, BT_DSB, BT_EPB, BT_DSB]
    assert after == before[:header] + secrets_block(LINE) + before[header:]
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["c.pcapng"]


def test_a_failed_rewrite_leaves_the_capture_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    header = capture_with_late_keys(path)
    before = path.read_bytes()
    squatter = tmp_path / f".c.pcapng.keytap-{os.getpid()}"
    squatter.symlink_to("/etc/passwd")  # never written through, never reused
    with pytest.raises(FileExistsError):
        put_secrets_first(path, header, secrets_block(LINE))
    assert path.read_bytes() == before and squatter.is_symlink()
