"""Output files: created new with mode 0600 (they hold secrets), never through a link, and
written block by block so that a full disk never leaves half a block; or stdout for `-o -`."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
import sys
import threading
from pathlib import Path

from keytap.errors import BadInput, KeytapError

STDOUT = "-"
IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers per writev
# A capture file's writeback is started for every WRITE_BEHIND_BYTES written, and what lies
# WRITE_BEHIND_LAG behind its end is waited for and dropped from the page cache (WriteBehind).
WRITE_BEHIND_BYTES = 4 << 20
WRITE_BEHIND_LAG = 16 << 20
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def check_output_path(path: str, option: str = "-o") -> None:
    """Refuse a path keytap cannot or must not write, before anything is attached or created."""
    if path == STDOUT:
        return
    if not path:
        raise BadInput(f"{option} needs a file name, not an empty string")
    try:
        _check_path(Path(path), option)
    except OSError as error:  # e.g. a directory on the way that keytap may not search
        raise BadInput(f"cannot write {path}: {error.strerror}") from None


def _check_path(target: Path, option: str) -> None:
    path = str(target)
    if target.is_symlink():
        raise BadInput(f"{option} {path} is a symbolic link: keytap does not follow links "
                       "(a planted one would get the secrets); name the file itself")
    if target.is_dir():
        raise BadInput(f"{option} {path} is a directory: give a file name, e.g. capture.pcapng")
    directory = target.parent
    if not directory.is_dir():
        raise BadInput(f"cannot write {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK) or (target.exists()
                                                         and not os.access(target, os.W_OK)):
        raise BadInput(f"cannot write {path}: permission denied (choose another {option} path)")


def same_file(first: str, second: str) -> bool:
    """Whether two output paths end up as one file (the second would corrupt the first)."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _reason(error: OSError) -> str:
    return "it is a symbolic link" if error.errno == errno.ELOOP else str(error.strerror)


def _create_private(path: str) -> int:
    """A file of keytap's own at `path`, mode 0600: created new under a temporary name beside it
    (O_EXCL, O_NOFOLLOW: never an existing file, never through a link) and renamed over `path`,
    so that whoever owned a file there keeps only its old contents, never the new secrets.
    A FIFO or a device (`-o /dev/null`) is opened as it is, never through a link either."""
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as error:
        raise KeytapError(f"cannot write {path}: {error.strerror}") from None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        try:
            return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            raise KeytapError(f"cannot write {path}: {_reason(error)}") from None
    fd, temporary = _create_temporary(path)
    try:
        os.rename(temporary, path)
    except OSError as error:
        os.close(fd)
        os.unlink(temporary)
        raise KeytapError(f"cannot write {path}: {error.strerror}") from None
    return fd


def _create_temporary(path: str) -> tuple[int, str]:
    """A new file beside `path` under a temporary name, mode 0600 (O_EXCL, O_NOFOLLOW), and
    that name: renamed over `path` when the caller says so."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.keytap")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise KeytapError(f"cannot write {path}: {_reason(error)}") from None
    try:
        os.fchmod(fd, 0o600)  # exactly, whatever the umask
    except OSError as error:
        os.close(fd)
        os.unlink(temporary)
        raise KeytapError(f"cannot write {path}: {error.strerror}") from None
    return fd, temporary


class WholeBlocks:
    """A buffered binary stream in which every write() is one block that reaches the file whole
    or not at all.

    io.BufferedWriter splits blocks at its buffer's edge, so after ENOSPC a file ended inside
    a block and tshark refused all of it. Here a failed flush cuts a regular file back to the
    end of its last whole block, and the blocks that did not make it are kept in `unwritten`
    (the sink counts their packets). The error is raised again for the caller to stop on.
    """

    def __init__(self, fd: int, limit: int = 1 << 20, write_behind: bool = False) -> None:
        """`write_behind`: a capture file, written behind (WriteBehind) if it is a regular
        file."""
        self._fd = fd
        self._limit = limit
        self._pending: list[bytes] = []
        self._size = 0
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self._behind = WriteBehind(fd) if write_behind and self._regular else None
        self.unwritten: list[bytes] = []

    def write(self, block: bytes) -> None:
        self._pending.append(block)
        self._size += len(block)
        if self._size >= self._limit:
            self.flush()

    def flush(self) -> None:
        """The pending blocks, gathered by writev (not joined: a bulk capture's copy too many)."""
        if not self._pending:
            return
        pending = self._pending
        self._pending, self._size = [], 0
        done = index = offset = 0  # bytes written; the first block not (wholly) written
        try:
            while index < len(pending):
                head = pending[index] if not offset else memoryview(pending[index])[offset:]
                written = os.writev(self._fd, [head, *pending[index + 1:index + IOV_MAX]])
                done += written
                while written:
                    left = len(pending[index]) - offset
                    if written < left:
                        offset += written
                        break
                    written -= left
                    index, offset = index + 1, 0
        except OSError:
            whole = kept = 0
            while kept < len(pending) and whole + len(pending[kept]) <= done:
                whole += len(pending[kept])
                kept += 1
            if self._regular and done > whole:
                end = os.lseek(self._fd, whole - done, os.SEEK_CUR)
                os.ftruncate(self._fd, end)
            self.unwritten += pending[kept:]
            if self._behind is not None:  # a full disk: nothing more to write behind
                self._behind.close()
                self._behind = None
            raise
        if self._behind is not None:
            self._behind.wrote(done)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._behind is not None:
                self._behind.close()
            os.close(self._fd)

    def __enter__(self) -> WholeBlocks:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class WriteBehind:
    """Writes a large file out as it grows, and drops it from the page cache once on disk.

    A buffered writer that dirties pages faster than the kernel's flusher writes them is
    throttled once past its dirty limits: ~300 MB/s on this VM, whose disk takes 1.4-2 GB/s,
    so a bulk capture lost in its rings what the disk could have taken. Started at once
    (sync_file_range), writeback keeps up: 2.3 GB/s. Dropping what is on disk (fadvise)
    keeps a capture of many GB from evicting the node's page cache. Both are done by a
    thread of their own: they may block (a device's queue full, a slow disk), and the
    capture loop must not; behind a slow disk the page cache takes bursts as before. Advice
    only: a file system that ignores it is written as before. (The os module has no
    sync_file_range: ctypes, which lets go of the GIL around the call.)
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
        if self._end - self._told >= WRITE_BEHIND_BYTES:
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


class PendingFile(WholeBlocks):
    """A capture file that appears under its name only once whole (a rotated file, -C/-G):
    written under a temporary name beside `path`, renamed over it by close()."""

    def __init__(self, path: str) -> None:
        """Raises KeytapError when `path` is there and not a regular file (`-w /dev/null -C 1`
        must never rename a file over a device)."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise KeytapError(f"cannot rotate into {path}: it is not a regular file")
        fd, self.temporary = _create_temporary(path)
        super().__init__(fd, write_behind=True)
        self.path = path
        self._closed = False

    def close(self) -> None:
        """Flush, close and rename into place (also after a failed flush: the file ends at
        its last whole block); a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            super().close()
        finally:
            os.rename(self.temporary, self.path)


def open_keylog(path: str) -> WholeBlocks:
    """The --keylog-file: NSS key-log lines, owner-only like the capture; the caller flushes
    after each session's lines."""
    return WholeBlocks(_create_private(path))


def open_output(path: str) -> WholeBlocks:
    """Open the capture for writing: a new file readable by its owner only, or stdout."""
    if path == STDOUT:
        # The capture gets the real stdout to itself; fd 1 then points at stderr so that a
        # stray print (from BCC or any library) cannot land in the middle of the pcapng stream.
        sys.stdout.flush()
        capture_fd = os.dup(sys.stdout.fileno())
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        return WholeBlocks(capture_fd)
    return WholeBlocks(_create_private(path), write_behind=True)


def write_private(path: str, text: str) -> None:
    """A small file written at once (--summary-json), created like the capture."""
    with WholeBlocks(_create_private(path)) as out:
        out.write(text.encode())
