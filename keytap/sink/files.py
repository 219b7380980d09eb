"""Output files: created new with mode 0600 (they hold secrets), never through a link, and
written block by block so that a full disk never leaves half a block; or stdout for `-o -`."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
from pathlib import Path

from keytap.errors import BadInput, KeytapError
from keytap.sink.write_behind import WriteBehind

STDOUT = "-"
IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers per writev


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
        self._pending: list[bytes] = []  # buffers, a block's parts one after another
        self._parted: dict[int, int] = {}  # index in _pending of a block in parts: their count
        self._size = 0
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self._behind = WriteBehind(fd) if write_behind and self._regular else None
        self.unwritten: list[bytes] = []

    def write(self, block: bytes) -> None:
        self._pending.append(block)
        self._size += len(block)
        if self._size >= self._limit:
            self.flush()

    def write_parts(self, *parts: bytes) -> None:
        """One block given as its parts, which writev gathers (a large packet is not copied
        into a joined block first)."""
        self._parted[len(self._pending)] = len(parts)
        self._pending += parts
        self._size += sum(map(len, parts))
        if self._size >= self._limit:
            self.flush()

    def flush(self) -> None:
        """The pending blocks, gathered by writev (not joined: a bulk capture's copy too many)."""
        if not self._pending:
            return
        pending, parted = self._pending, self._parted
        self._pending, self._parted, self._size = [], {}, 0
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
            blocks = _blocks(pending, parted)
            whole = kept = 0
            while kept < len(blocks) and whole + len(blocks[kept]) <= done:
                whole += len(blocks[kept])
                kept += 1
            if self._regular and done > whole:
                end = os.lseek(self._fd, whole - done, os.SEEK_CUR)
                os.ftruncate(self._fd, end)
            self.unwritten += blocks[kept:]
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


def _blocks(pending: list[bytes], parted: dict[int, int]) -> list[bytes]:
    """The blocks whose buffers (a block's parts one after another) are `pending`."""
    blocks, index = [], 0
    while index < len(pending):
        count = parted.get(index, 1)
        blocks.append(b"".join(pending[index:index + count]) if count > 1 else pending[index])
        index += count
    return blocks


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
