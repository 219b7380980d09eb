"""Find the OpenSSL copies used by the processes behind a captured interface.

A captured interface is usually the host end of a pod's veth; the processes that own the TLS
sessions live in the network namespace at the far end. From there: every process in that
namespace, every ELF file it has mapped, and which of those implement the OpenSSL TLS API
(a libssl, or an executable/extension module with OpenSSL built in).

Files are reached through /proc/PID/root so a container's own file system is read, and
identified by (st_dev, st_ino, st_mtime_ns) so a library shared by many processes is parsed once.
A file deleted or replaced since it was mapped (a libssl upgraded under a running service) is
reached through /proc/PID/map_files, which still leads to the mapped inode: the uprobes attach
there too, and its display path says "(deleted)".
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from keytap.kernel.peers import all_pids, netns_id
from keytap.tls.libraries import TlsLibrary, inspect_library, process_root

_SHARED_OBJECT = re.compile(r"\.so(\.|$)")
_DELETED = " (deleted)"

_FileKey = tuple[int, int, int]  # st_dev, st_ino, st_mtime_ns


@dataclass(frozen=True, slots=True)
class ProcessLibrary:
    """One TLS library as used by one process (the pid matters for per-process uprobes)."""

    pid: int
    library: TlsLibrary


@dataclass(frozen=True, slots=True)
class _Mapping:
    """A file mapped by a process, as /proc/PID/maps names it."""

    display_path: str
    dev: str  # "fd:01", from maps; not comparable with stat's st_dev on overlayfs
    inode: int
    addresses: str  # "7f4d...-7f4d...", one of its mappings: its name in /proc/PID/map_files
    deleted: bool


class LibraryCache:
    """inspect_library results keyed by file identity, so each file is parsed once.

    Keyed by (st_dev, st_ino, st_mtime_ns) of the file and of the libcrypto it was inspected
    with; a hit is returned with the paths of the current caller (another process may reach
    the same inode through its own /proc/PID/root). Negative results are cached too: most
    mapped files are not TLS libraries.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[_FileKey, _FileKey | None], TlsLibrary | None] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def inspect(
        self, path: Path, display_path: str, crypto: tuple[Path, str] | None = None
    ) -> TlsLibrary | None:
        """inspect_library(path), with `crypto` (path, display path) as its libcrypto if given.

        Raises OSError if `path` cannot be read.
        """
        key = (_file_key(path), _file_key(crypto[0]) if crypto is not None else None)
        if key in self._entries:
            cached = self._entries[key]
            return None if cached is None else _rebase(cached, path, display_path, crypto)
        resolver = None if crypto is None else (lambda _name: crypto)
        library = inspect_library(path, display_path, resolve_needed=resolver)
        self._entries[key] = library
        return library


def pids_in_netns(netns_ids: Collection[int] | None) -> list[int]:
    """Processes (not threads) whose network namespace is one of `netns_ids`; None = all."""
    wanted = None if netns_ids is None else frozenset(netns_ids)
    pids = []
    for pid in all_pids():
        if wanted is not None:
            try:
                if netns_id(pid) not in wanted:
                    continue
            except OSError:  # exited meanwhile, or a kernel we may not look into
                continue
        pids.append(pid)
    return sorted(pids)


def libraries_of_process(pid: int, cache: LibraryCache) -> list[TlsLibrary]:
    """The TLS libraries `pid` has mapped: libssl (with its libcrypto) or built-in OpenSSL.

    Candidates are mapped shared objects (*.so, *.so.N) and the main executable, each once.
    A mapping is skipped when its file is unreadable (a deleted one is read as it was mapped).
    libcrypto is not reported on its own (no SSL_* in it): it is part of the libssl entry.
    """
    try:
        mappings = _file_mappings(pid)
        exe_inode = os.stat(f"/proc/{pid}/exe").st_ino
    except OSError:  # gone, or a kernel thread (no exe)
        return []
    cryptos = [m for m in mappings if os.path.basename(m.display_path).startswith("libcrypto")]
    found: list[TlsLibrary] = []
    for mapping in mappings:
        name = os.path.basename(mapping.display_path)
        if mapping.inode != exe_inode and not _SHARED_OBJECT.search(name):
            continue
        reached = _reachable(pid, mapping)
        if reached is None:
            continue
        crypto = _crypto_for(mapping, cryptos, pid) if name.startswith("libssl") else None
        try:
            library = cache.inspect(*reached, crypto)
        except OSError:
            continue
        if library is not None:
            found.append(library)
    return found


def process_libraries(
    netns_ids: Collection[int] | None, cache: LibraryCache
) -> list[ProcessLibrary]:
    """Every (pid, TLS library) pair in the given network namespaces (None = all)."""
    return [
        ProcessLibrary(pid, library)
        for pid in pids_in_netns(netns_ids)
        for library in libraries_of_process(pid, cache)
    ]


# --- internals -------------------------------------------------------------------------------


def _file_mappings(pid: int) -> list[_Mapping]:
    """Mapped files of `pid`, once per (dev, inode). Raises OSError."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as maps:
        lines = maps.read().splitlines()
    seen: set[tuple[str, int]] = set()
    result = []
    for line in lines:
        # address perms offset dev inode pathname (pathname may contain spaces)
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        dev, inode, pathname = fields[3], int(fields[4]), fields[5]
        if inode == 0 or (dev, inode) in seen:
            continue
        seen.add((dev, inode))
        deleted = pathname.endswith(_DELETED)
        result.append(_Mapping(pathname.removesuffix(_DELETED) if deleted else pathname, dev,
                               inode, fields[0], deleted))
    return result


def _reachable(pid: int, mapping: _Mapping) -> tuple[Path, str] | None:
    """The mapped file and the name to show for it: through the process's root while that is
    still the mapped inode, else (deleted, replaced, another mount) through map_files."""
    if not mapping.deleted:
        real = Path(f"/proc/{pid}/root") / mapping.display_path.lstrip("/")
        try:
            if os.stat(real).st_ino == mapping.inode:
                return real, mapping.display_path
        except OSError:
            pass
    start, _, end = mapping.addresses.partition("-")  # maps pads them; map_files does not
    kept = Path(f"/proc/{pid}/map_files/{int(start, 16):x}-{int(end, 16):x}")
    try:
        if os.stat(kept).st_ino != mapping.inode:
            return None
    except OSError:
        return None
    return kept, mapping.display_path + (_DELETED if mapping.deleted else "")


def _crypto_for(libssl: _Mapping, cryptos: list[_Mapping], pid: int) -> tuple[Path, str] | None:
    """The mapped libcrypto that goes with a libssl: same suffix (.so.3), then same directory."""
    ssl_dir, ssl_name = os.path.split(libssl.display_path)
    suffix = ssl_name.removeprefix("libssl")

    def rank(m: _Mapping) -> tuple[bool, bool]:
        directory, name = os.path.split(m.display_path)
        return (name.removeprefix("libcrypto") != suffix, directory != ssl_dir)

    for mapping in sorted(cryptos, key=rank):
        reached = _reachable(pid, mapping)
        if reached is not None:
            return reached
    return None


def _file_key(path: Path) -> _FileKey:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def _rebase(
    library: TlsLibrary, path: Path, display_path: str, crypto: tuple[Path, str] | None
) -> TlsLibrary:
    """A cached result with the paths of the current caller (its own /proc/PID/root)."""
    changes: dict[str, object] = {"path": path, "display_path": display_path}
    if crypto is not None:
        changes["crypto_path"], changes["crypto_display_path"] = crypto
    elif library.crypto_path is not None:
        old_root, new_root = process_root(library.path), process_root(path)
        if old_root != new_root and library.crypto_path.is_relative_to(old_root):
            changes["crypto_path"] = new_root / library.crypto_path.relative_to(old_root)
    return dataclasses.replace(library, **changes)
