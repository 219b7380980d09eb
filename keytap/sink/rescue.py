"""Late keys put ahead of the packets they decrypt: the capture file rewritten once, at the end.

A DSB only decrypts what comes after it, so keys that arrived after their session's packets
were written (a process probed late) are useless where they were written. At the end of a
capture to a regular file, a copy of them goes right after the header (SHB and IDBs, before
any packet): a new file beside the output, created exclusively with mode 0600, written,
synced, and renamed over it. If that fails (a full disk), the original stays as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def put_secrets_first(path: Path, header_size: int, blocks: bytes) -> None:
    """Rewrite `path` with `blocks` inserted after its first `header_size` bytes."""
    temporary = path.with_name(f".{path.name}.keytap-{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as original:
            out.write(original.read(header_size))
            out.write(blocks)
            shutil.copyfileobj(original, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
