"""`keytap libs`: which TLS libraries keytap would instrument, and whether it can read them.

The same discovery and offsets lookup as a capture, without BPF: a quick answer to "will my
pod's keys be captured?" before starting one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from keytap.tls.accessors import mismatches
from keytap.tls.candidates import machine_code_offsets
from keytap.tls.discovery import LibraryCache, libraries_of_process, pids_in_netns
from keytap.tls.golang import GoBuild
from keytap.tls.libraries import Flavor, Linkage, TlsLibrary, process_root
from keytap.tls.offsets import OffsetTable
from keytap.tls.remembered import RememberedLayouts


@dataclass(frozen=True)
class LibraryReport:
    """One library file and what keytap would do with it."""

    display_path: str
    pids: tuple[int, ...]
    library: TlsLibrary

    @property
    def found_as(self) -> str:
        how = "static" if self.library.linkage is Linkage.STATIC else "dynamic"
        root = process_root(self.library.path)
        return how if _is_own_root(root) else f"{how}, in {root}"

    def offsets(self, table: OffsetTable, remembered: RememberedLayouts) -> str:
        """exact (build id or version), proven earlier, candidates, or unknown."""
        library = self.library
        if library.go is not None:
            return _go_probe(library.go)
        if library.flavor is not Flavor.OPENSSL:
            return f"{library.flavor.name.title()} not supported yet"
        if table.lookup_build(library.build_id) is not None:
            return "yes (build id)"
        by_version = table.lookup_version(library.version or "")
        contradicted = (mismatches(machine_code_offsets(library.path), by_version)
                        if by_version is not None and table.shipped else [])
        if by_version is not None and not contradicted:
            return "yes (version)"
        if remembered.lookup(library.build_id) is not None:
            return "yes (proven earlier)"
        if contradicted:
            return (f"candidates: the version's entry disagrees with the machine code "
                    f"({', '.join(contradicted)})")
        candidates = table.candidates(library.version or "")
        if candidates:
            return (f"candidates: {len(candidates)} layouts, nearest "
                    f"{', '.join(release for release, _ in candidates[:3])}")
        return "unknown: keys not captured (--offsets FILE)"


def list_libraries(netns_ids: set[int] | None, pid: int | None = None) -> list[LibraryReport]:
    """TLS libraries of one process, or of every process in the given namespaces."""
    cache = LibraryCache()
    pids = [pid] if pid is not None else pids_in_netns(netns_ids)
    by_file: dict[tuple[str, str | None], tuple[TlsLibrary, list[int]]] = {}
    for each in pids:
        for library in libraries_of_process(each, cache):
            key = (library.display_path, library.build_id)
            by_file.setdefault(key, (library, []))[1].append(each)
    return [LibraryReport(library.display_path, tuple(sorted(pids)), library)
            for library, pids in sorted(by_file.values(), key=lambda item: item[0].display_path)]


def format_reports(reports: list[LibraryReport], table: OffsetTable,
                   remembered: RememberedLayouts) -> list[str]:
    rows = [("library", "version", "found as", "offsets", "pids")]
    for report in reports:
        pids = ",".join(map(str, report.pids[:5])) + ("..." if len(report.pids) > 5 else "")
        rows.append((report.display_path, report.library.version or "?", report.found_as,
                     report.offsets(table, remembered), pids))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _go_probe(go: GoBuild) -> str:
    """A Go binary has no offsets: where its writeKeyLog is, and how it takes arguments."""
    if go.keylog_address is None:
        return f"not probed: {go.reason}"
    if go.register_abi is None:
        return "not probed: no Go version in its build info"
    return f"writeKeyLog ({'register' if go.register_abi else 'stack'} ABI)"


def _is_own_root(root: Path) -> bool:
    """Whether a /proc/PID/root is keytap's own file system (no container in between)."""
    try:
        return root.resolve() == Path("/")
    except OSError:
        return True
