"""Issue 16: a capture file is written out as it grows and leaves the page cache once on disk,
and a slow disk never stalls the writer."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from keytap.sink import write_behind
from keytap.sink.files import open_keylog, open_output


def test_a_capture_file_is_written_behind_and_dropped_from_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: writeback starts as the file grows (a bulk capture is not throttled as a
    dirty-page hog), and what is on disk WRITE_BEHIND_LAG behind the end leaves the cache;
    by a thread of its own (it may block), so the order of calls is all there is to check."""
    path = tmp_path / "c.pcapng"
    calls: list[tuple[str, int, int, int, int]] = []

    def sync_file_range(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append(("sync", fd, offset, offset + length, flags))
        return 0

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append(("fadvise", fd, offset, offset + length, advice))

    monkeypatch.setattr(write_behind.os, "posix_fadvise", fadvise)
    monkeypatch.setattr(write_behind.ctypes, "CDLL", lambda *_, **__: SimpleNamespace(
        sync_file_range=sync_file_range))
    monkeypatch.setattr(write_behind, "WAKE_EVERY", 256 << 10)  # (a few MB suffice then)
    monkeypatch.setattr(write_behind, "WRITE_BEHIND_BYTES", 64 << 10)
    monkeypatch.setattr(write_behind, "WRITE_BEHIND_LAG", 512 << 10)
    stream = open_output(str(path))
    blocks = [bytes([n % 251]) * (100 + n * 7919 % 7_000) for n in range(1000)]
    for n, block in enumerate(blocks):
        stream.write(block)
        if n % 7 == 0:
            stream.flush()
    stream.flush()
    fd, total, told = stream._fd, sum(map(len, blocks)), stream._behind._told
    # Until the thread has started the writeback of all it was told of (at most 5 s: the
    # assertions below then say what it did).
    for _ in range(500):
        if any(c[0] == "sync" and c[3] >= told for c in calls):
            break
        time.sleep(0.01)
    stream.close()
    assert path.read_bytes() == b"".join(blocks)
    assert {c[1] for c in calls} == {fd}
    started = [(c[2], c[3]) for c in calls if c[0] == "sync" and c[4] == 2]
    waited = [(c[2], c[3]) for c in calls if c[0] == "sync" and c[4] == 1 | 2 | 4]
    dropped = [(c[2], c[3]) for c in calls if c[0] == "fadvise"]
    assert len(started) + len(waited) == sum(c[0] == "sync" for c in calls)
    assert total - write_behind.WAKE_EVERY < told <= started[-1][1] and started[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(started))  # each byte once, in order
    assert all(end - start <= write_behind.WRITE_BEHIND_BYTES for start, end in started)
    assert waited and waited[0][0] == 0 and dropped == waited
    assert all(a[1] == b[0] for a, b in itertools.pairwise(waited))
    assert all(c[4] == os.POSIX_FADV_DONTNEED for c in calls if c[0] == "fadvise")
    for index, call in enumerate(calls):  # what is waited for lags what was started
        if call[0] == "sync" and call[4] != 2:
            latest = max(c[3] for c in calls[:index] if c[0] == "sync" and c[4] == 2)
            assert call[3] <= latest - write_behind.WRITE_BEHIND_LAG


def test_only_capture_files_are_written_behind(tmp_path: Path) -> None:
    """Key logs and summaries are small; a pipe or device has no page cache to spare."""
    capture = open_output(str(tmp_path / "c.pcapng"))
    keylog = open_keylog(str(tmp_path / "keys.log"))
    device = open_output("/dev/null")
    try:
        assert capture._behind is not None
        assert keylog._behind is None and device._behind is None
    finally:
        for stream in (capture, keylog, device):
            stream.close()


def test_a_slow_disk_never_stalls_the_writer(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Writeback behind a slow disk blocks the thread that started it, never the writes; and
    closing waits for the piece under way, not for all that is behind it."""
    path, opened = tmp_path / "c.pcapng", []
    calls: list[tuple[int, int, int]] = []

    def sync_file_range(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((offset, length, flags))
        while not opened[0]._behind._closing:  # a disk that takes until the capture ends
            time.sleep(0.001)
        return 0

    monkeypatch.setattr(write_behind.os, "posix_fadvise", lambda *_: None)
    monkeypatch.setattr(write_behind.ctypes, "CDLL", lambda *_, **__: SimpleNamespace(
        sync_file_range=sync_file_range))
    opened.append(stream := open_output(str(path)))
    for _ in range(40):
        stream.write(bytes(1 << 20))
        stream.flush()
    assert len(calls) <= 1  # 40 MiB written while the first piece's writeback waits
    stream.close()
    assert len(calls) <= 1 and path.stat().st_size == 40 << 20
