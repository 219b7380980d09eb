"""The capture file: created with mode 0600 (it holds secrets), or standard output for `-o -`."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO, TextIO

from keytap.errors import BadInput, KeytapError

STDOUT = "-"


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


def _create_private(path: str) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise KeytapError(f"cannot write {path}: {error.strerror}") from None
    if stat.S_ISREG(os.fstat(fd).st_mode):  # never chmod a device (-o /dev/null) or a FIFO
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    return fd


def open_keylog(path: str) -> TextIO:
    """The --keylog-file: NSS key-log lines as they arrive, owner-only like the capture."""
    return os.fdopen(_create_private(path), "w", buffering=1)


def open_output(path: str) -> BinaryIO:
    """Open the capture for writing; a file is (re)created readable by its owner only."""
    if path == STDOUT:
        # The capture gets the real stdout to itself; fd 1 then points at stderr so that a
        # stray print (from BCC or any library) cannot land in the middle of the pcapng stream.
        sys.stdout.flush()
        capture_fd = os.dup(sys.stdout.fileno())
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        return os.fdopen(capture_fd, "wb", buffering=1 << 20)
    return os.fdopen(_create_private(path), "wb", buffering=1 << 20)
