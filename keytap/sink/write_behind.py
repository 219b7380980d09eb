"""Writing a capture file out as it grows, and dropping it from the page cache once on disk.

A buffered writer that dirties pages faster than the kernel's flusher writes them is throttled
once past its dirty limits: ~300 MB/s on this VM, whose disk takes 1.4-2 GB/s, so a bulk
capture lost in its rings what the disk could have taken. Started at once (sync_file_range),
writeback keeps up. Dropping what is on disk (fadvise) keeps a capture of many GB from evicting
the node's page cache. Measurements: docs/DESIGN.md, "Reading the packet ring".
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

# The thread is woken for every WAKE_EVERY bytes written (each wakeup costs the capture loop
# a switch between threads), starts writeback a WRITE_BEHIND_BYTES piece at a time, and waits
# for what lies WRITE_BEHIND_LAG behind the end and drops it from the page cache.
WAKE_EVERY = 16 << 20
WRITE_BEHIND_BYTES = 4 << 20
WRITE_BEHIND_LAG = 32 << 20
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


class WriteBehind:
    """Writes a regular file out behind its writer, in a thread of its own: the calls block on
    a full device queue or a slow disk, and the capture loop must not (behind a slow disk, the
    page cache takes bursts as before). Advice only: a file system that ignores it is written
    as before. (The os module has no sync_file_range: ctypes, which lets go of the GIL around
    the call.)
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._end = os.lseek(fd, 0, os.SEEK_CUR)  # bytes written up to here
        self._told = self._end  # ... when the thread was last woken
        self._closing = False
        self._wake = threading.Event()
        libc = ctypes.CDLL(None, use_errno=True)
        self._sync_file_range = libc.sync_file_range
        self._sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_uint]
        self._thread = threading.Thread(target=self._run, name="keytap-write-behind",
                                        daemon=True)
        self._thread.start()

    def wrote(self, size: int) -> None:
        """`size` more bytes were written at the end."""
        self._end += size
        if self._end - self._told >= WAKE_EVERY:
            self._told = self._end
            self._wake.set()

    def close(self) -> None:
        """Once the thread is done with the file (before it is closed)."""
        self._closing = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        """Writeback started a piece at a time (behind a slow disk, close() waits for one
        piece at most), and what lies WRITE_BEHIND_LAG behind waited for and dropped."""
        started = dropped = self._end  # writeback started, and dropped, up to here
        while not self._closing:
            self._wake.wait()
            self._wake.clear()
            while started < self._end and not self._closing:
                end = min(self._end, started + WRITE_BEHIND_BYTES)
                self._sync(started, end, _SYNC_FILE_RANGE_WRITE)
                started = end
                done = end - WRITE_BEHIND_LAG
                if done > dropped:
                    self._sync(dropped, done, _SYNC_FILE_RANGE_WAIT_BEFORE
                               | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER)
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(self._fd, dropped, done - dropped,
                                         os.POSIX_FADV_DONTNEED)
                    dropped = done

    def _sync(self, start: int, end: int, flags: int) -> None:
        if end > start:
            self._sync_file_range(self._fd, start, end - start, flags)  # errors: as before
