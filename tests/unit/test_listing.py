"""`keytap libs`: what each library's layout would be: exact, proven earlier, candidates, none."""

from __future__ import annotations

from pathlib import Path

import pytest

from keytap.tls.libraries import Flavor, Linkage, TlsLibrary
from keytap.tls.listing import LibraryReport
from keytap.tls.offsets import OffsetTable
from keytap.tls.remembered import RememberedLayouts


def report(version: str, build_id: str | None = None,
           flavor: Flavor = Flavor.OPENSSL) -> LibraryReport:
    library = TlsLibrary(Path("/usr/lib/libssl.so.3"), "/usr/lib/libssl.so.3", flavor,
                         version, Linkage.DYNAMIC, build_id, {})
    return LibraryReport(library.display_path, (1,), library)


@pytest.fixture
def table() -> OffsetTable:
    return OffsetTable.load()


def test_each_way_a_layout_can_come(table: OffsetTable, tmp_path: Path) -> None:
    remembered = RememberedLayouts(tmp_path / "proven.json")
    assert report("3.0.22").offsets(table, remembered) == "yes (version)"
    build = table.build_ids()[0]
    assert report("4.0.3", build).offsets(table, remembered) == "yes (build id)"
    layout = table.lookup("3.6.3")
    assert layout is not None
    remembered.remember("abcd", "3.6.9", layout, ["1.2", "1.3"])
    assert report("3.6.9", "abcd").offsets(table, remembered) == "yes (proven earlier)"
    assert report("3.6.9", "ef01").offsets(table, remembered).startswith(
        "candidates: ")  # e.g. "candidates: 19 layouts, nearest 3.6.3, 3.5.7, ..."
    assert report("").offsets(table, remembered).startswith("unknown")
    assert "not supported" in report("3.8.0", flavor=Flavor.BORINGSSL).offsets(table,
                                                                               remembered)


def test_a_version_entry_its_machine_code_contradicts_is_no_exact_entry(
        table: OffsetTable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A vendored copy under an upstream version number (quictls in Node.js's 3.0)."""
    entry = table.lookup("3.0.15")
    assert entry is not None
    monkeypatch.setattr("keytap.tls.listing.machine_code_offsets",
                        lambda _path: {"session": entry.session + 192, "server": entry.server})
    offsets = report("3.0.15").offsets(table, RememberedLayouts(tmp_path / "proven.json"))
    assert offsets == "candidates: the version's entry disagrees with the machine code (session)"
