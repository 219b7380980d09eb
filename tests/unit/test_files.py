"""Issue 14: output files never follow links nor reuse another's file; a full disk leaves
whole blocks, and every packet is still accounted for."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from keytap.errors import KeytapError
from keytap.events import Direction, KeyEvent, PacketEvent
from keytap.report import CaptureStats, InterfaceStats
from keytap.sink import files
from keytap.sink.capture_file import CaptureFile
from keytap.sink.files import (
    WholeBlocks,
    check_output_path,
    open_keylog,
    open_output,
    write_private,
)
from keytap.sink.pcapng import PARTS_FROM
from tests.support.pcapng_blocks import BT_EPB, BT_ISB, BT_SHB, walk

OPENERS: list[Callable[[str], object]] = [open_output, open_keylog]


@pytest.mark.parametrize("opener", OPENERS, ids=["output", "keylog"])
@pytest.mark.parametrize("dangling", [False, True], ids=["to_a_file", "dangling"])
def test_a_planted_symlink_is_refused(tmp_path: Path, opener: Callable[[str], object],
                                      dangling: bool) -> None:
    target = tmp_path / "victim"
    if not dangling:
        target.write_text("precious\n")
        target.chmod(0o644)
    link = tmp_path / "out.pcapng"
    link.symlink_to(target)
    with pytest.raises(KeytapError, match="symbolic link"):
        check_output_path(str(link))
    with pytest.raises(KeytapError, match=str(link)):
        opener(str(link))  # planted between the check and the open
    assert link.is_symlink()
    if dangling:
        assert not target.exists()
    else:
        assert target.read_text() == "precious\n" and stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_planted_symlink_is_refused_for_the_summary(tmp_path: Path) -> None:
    link = tmp_path / "summary.json"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeytapError, match="symbolic link"):
        write_private(str(link), "{}\n")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("opener", [*OPENERS, lambda p: write_private(p, "{}")],
                         ids=["output", "keylog", "summary"])
def test_another_users_file_is_replaced_never_reused(tmp_path: Path,
                                                     opener: Callable[[str], object]) -> None:
    path = tmp_path / "out"
    path.write_text("theirs\n")
    os.chown(path, 65534, 65534)
    path.chmod(0o666)
    theirs = os.open(path, os.O_RDONLY)  # what the other user still holds open
    try:
        stream = opener(str(path))
        if stream is not None:
            stream.write(b"secrets")
            stream.close()
        mine = path.stat()
        assert (mine.st_uid, stat.S_IMODE(mine.st_mode)) == (os.geteuid(), 0o600)
        assert mine.st_ino != os.fstat(theirs).st_ino
        assert os.pread(theirs, 100, 0) == b"theirs\n"  # the secrets never reach their inode
    finally:
        os.close(theirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_a_fifo_is_written_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "live"
    os.mkfifo(fifo, 0o640)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with open_output(str(fifo)) as stream:
            stream.write(b"block")
        assert os.read(reader, 10) == b"block"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and stat.S_IMODE(fifo.stat().st_mode) == 0o640


class Disk:
    """os.write on a device of `capacity` bytes: a short write, then ENOSPC; a truncated file
    gives its room back."""

    def __init__(self, capacity: int, only: int | None = None) -> None:
        self.capacity, self.only = capacity, only  # only: the one fd on that device
        self._write = os.write

    def __call__(self, fd: int, data: memoryview | bytes) -> int:
        if self.only is not None and fd != self.only:
            return self._write(fd, data)
        room = self.capacity - os.fstat(fd).st_size
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._write(fd, bytes(data[:room]))

    def writev(self, fd: int, buffers: list[memoryview | bytes]) -> int:
        return self(fd, b"".join(buffers))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """As keytap's files see os.write and os.writev."""
        monkeypatch.setattr(files.os, "write", self)
        monkeypatch.setattr(files.os, "writev", self.writev)


@pytest.mark.parametrize("in_parts", [False, True])
def test_a_failed_flush_ends_the_file_at_its_last_whole_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_parts: bool) -> None:
    """Also for blocks handed over in parts (a large packet's): whole blocks are cut and kept."""
    path = tmp_path / "f"
    stream = WholeBlocks(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), limit=1 << 30)
    Disk(250).install(monkeypatch)
    blocks = [bytes(range(n, n + 100)) for n in range(5)]
    for block in blocks:
        if in_parts:
            stream.write_parts(block[:10], block[10:90], block[90:])
        else:
            stream.write(block)
    with pytest.raises(OSError) as raised:
        stream.flush()
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == blocks[0] + blocks[1]
    assert stream.unwritten == blocks[2:]
    stream.write(b"x" * 8)  # the cut made room for a small block at the right place
    stream.close()
    assert path.read_bytes() == blocks[0] + blocks[1] + b"x" * 8


def packets(n: int, ifindex: int = 7, size: int = 1000) -> list[PacketEvent]:
    return [PacketEvent(1_000 + i, ifindex, Direction.INBOUND, size, bytes(size))
            for i in range(n)]


@pytest.mark.parametrize("size", [1000, PARTS_FROM + 1])  # blocks joined, blocks in parts
@pytest.mark.parametrize("room", [0, 700, 5_000, 60_000])
def test_disk_full_stops_writing_with_exact_accounting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int, size: int) -> None:
    path = tmp_path / "c.pcapng"
    stream = open_output(str(path))
    stats = CaptureStats([InterfaceStats("kp1", 7)])
    sink = CaptureFile(stream, stats, 262144, False, None, None, application="t", os_name="")
    Disk(room).install(monkeypatch)
    key = KeyEvent(999, b"\1" * 32, ("CLIENT_RANDOM " + "01" * 32 + " " + "02" * 48,), slot=0)
    for _ in range(40):  # batches as the loop hands them over, 2.5 MB or more in all
        sink.write([key, *packets(60, size=size)])
    sink.finish()
    stream.close()
    interface = stats.interfaces[0]
    assert sink.failure is not None and sink.failure.errno == errno.ENOSPC
    assert interface.written + interface.unwritten == 2400
    assert interface.dropped == interface.unwritten > 0
    blocks = walk(path.read_bytes())  # whole blocks only, or this raises
    if room:
        assert blocks[0].type == BT_SHB
    assert sum(b.type == BT_EPB for b in blocks) == interface.written
    assert interface.written_bytes == size * interface.written
    if room > 700:  # the cut back made room for the statistics block
        assert blocks[-1].type == BT_ISB


def test_a_full_key_log_stops_cleanly_at_a_whole_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output, keylog_path = tmp_path / "c.pcapng", tmp_path / "keys.log"
    stream, keylog = open_output(str(output)), open_keylog(str(keylog_path))
    stats = CaptureStats([InterfaceStats("kp1", 7)])
    sink = CaptureFile(stream, stats, 262144, False, None, keylog, application="t", os_name="")
    Disk(400, keylog._fd).install(monkeypatch)  # two lines' room
    for n in range(5):
        line = f"CLIENT_RANDOM {n:064x} {'02' * 48}"
        sink.write([KeyEvent(999, bytes(32), (line,), slot=0), *packets(1)])
    monkeypatch.undo()
    sink.finish()
    stream.close()
    keylog.close()
    assert sink.failure is not None and sink.failure.errno == errno.ENOSPC
    lines = keylog_path.read_text()
    assert lines.endswith("\n") and len(lines.splitlines()) == 2
    interface = stats.interfaces[0]
    assert interface.written + interface.unwritten == 5
    assert walk(output.read_bytes())[-1].type == BT_ISB


def test_short_writes_and_more_blocks_than_one_writev_takes_keep_the_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """writev may write less than asked, and takes at most IOV_MAX buffers a call."""
    path = tmp_path / "f"
    real_writev, calls = os.writev, []

    def short_writev(fd: int, buffers: list) -> int:
        assert len(buffers) <= files.IOV_MAX
        calls.append(len(buffers))
        return real_writev(fd, [b"".join(bytes(b) for b in buffers)[:37]])

    monkeypatch.setattr(files.os, "writev", short_writev)
    stream = WholeBlocks(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), limit=1 << 30)
    blocks = [bytes([n % 251]) * (1 + n % 50) for n in range(3 * files.IOV_MAX)]
    for n, block in enumerate(blocks):
        if n % 3:
            stream.write(block)
        else:  # in parts, which may straddle two writev calls
            stream.write_parts(block[:1], block[1:], b"")
    stream.close()
    assert path.read_bytes() == b"".join(blocks) and max(calls) == files.IOV_MAX
