"""Layouts proven on the wire, remembered by build id so that the next capture starts proven.

One JSON file under /var/cache/keytap (KEYTAP_CACHE_DIR overrides the directory), owner-only,
replaced atomically: a new file created exclusively beside it, written, synced, renamed over.
It holds only struct offsets, but it steers what keytap reads from processes' memory, so it is
trusted only when root owns it and nobody else can write it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import asdict
from pathlib import Path

from keytap.tls.offsets import Layout, normalize_build_id
from keytap.tls.selfcheck import PROTOCOLS

DEFAULT_DIR = Path("/var/cache/keytap")
FILE_NAME = "proven-layouts.json"


def cache_dir() -> Path:
    return Path(os.environ.get("KEYTAP_CACHE_DIR", DEFAULT_DIR))


class RememberedLayouts:
    """build id -> the layout a capture proved, with the protocols it was proven for."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / FILE_NAME
        self._entries: dict[str, dict] = self._read()

    def lookup(self, build_id: str | None) -> tuple[Layout, tuple[str, ...]] | None:
        entry = self._entries.get(normalize_build_id(build_id)) if build_id else None
        if entry is None:
            return None
        try:
            layout = Layout.from_dict(entry["layout"], f"{self.path}: {build_id}")
            protocols = tuple(p for p in entry["protocols"] if p in PROTOCOLS)
        except (KeyError, TypeError, ValueError):
            return None
        return (layout, protocols) if protocols else None

    def remember(self, build_id: str, version: str | None, layout: Layout,
                 protocols: list[str]) -> None:
        key = normalize_build_id(build_id)
        entry = {"version": version, "layout": asdict(layout), "protocols": sorted(protocols)}
        if self._entries.get(key) == entry:
            return
        self._entries[key] = entry
        with contextlib.suppress(OSError):  # a read-only /var: remembered for this run only
            self._write()

    def _read(self) -> dict[str, dict]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return {}
        with os.fdopen(fd) as stream:
            info = os.fstat(stream.fileno())
            if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return {}
            try:
                data = json.load(stream)
            except ValueError:
                return {}
        entries = data.get("build_ids") if isinstance(data, dict) else None
        return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(
            entries, dict) else {}

    def _write(self) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(f"{directory} is not a directory of ours")
        temporary = directory / f".{FILE_NAME}.{os.getpid()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as stream:
                json.dump({"build_ids": self._entries}, stream, indent=1, sort_keys=True)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
