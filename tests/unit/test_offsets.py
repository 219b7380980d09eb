"""The shipped OpenSSL offsets table and its loader.

The table is generated (tools/gen_offsets.py); these tests pin the structural facts the
uprobes rely on, so a bad regeneration or a hand edit is caught before it reads wrong bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from keytap.kernel.abi import CANDIDATES, LAYOUT_FIELDS
from keytap.tls.candidates import candidate_layouts
from keytap.tls.offsets import DEFAULT_PATH, Layout, OffsetTable

REPO = Path(__file__).resolve().parents[2]

# Debian 12's libssl3 and the OpenSSLs statically linked into the `cryptography` wheels.
REQUIRED_VERSIONS = ["3.0.19", "1.1.1l", "3.0.7", "3.1.4", "3.2.2", "3.3.2", "3.4.1", "3.5.2"]


def _load_generator():
    """tools/gen_offsets.py as a module (tools/ is not a package): the field names it writes."""
    spec = importlib.util.spec_from_file_location("gen_offsets", REPO / "tools" / "gen_offsets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_offsets"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["gen_offsets"]
    return module


GENERATOR = _load_generator()
CONN_ARRAYS = GENERATOR.TLS13_ARRAYS  # the TLS 1.3 secrets, members of the connection


def vkey(version: str) -> tuple[int, int, int]:
    major, minor, patch = version.split(".")
    return int(major), int(minor), int(patch.rstrip("abcdefghijklmnopqrstuvwxyz"))


@pytest.fixture(scope="module")
def table() -> OffsetTable:
    return OffsetTable.load()


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return json.loads(DEFAULT_PATH.read_text())


def layout_of(table: OffsetTable, version: str) -> Layout:
    layout = table.lookup(version)
    assert layout is not None, version
    return layout


def test_default_path_is_the_repo_table() -> None:
    assert REPO / "offsets" / "openssl.json" == DEFAULT_PATH
    assert DEFAULT_PATH.is_file()


@pytest.mark.parametrize("version", REQUIRED_VERSIONS)
def test_required_versions_present(table: OffsetTable, version: str) -> None:
    assert version in table.versions()
    entry = table.entry(version)
    assert entry is not None and entry.tag is not None
    # provenance: the tag spells the version
    assert entry.tag in (f"openssl-{version}", "OpenSSL_" + version.replace(".", "_"))


def test_known_layouts(table: OffsetTable) -> None:
    deb = layout_of(table, "3.0.19")
    assert deb.s3_is_pointer is False
    assert (deb.ssl_version, deb.server, deb.s3, deb.session) == (0, 56, 168, 2328)
    old = layout_of(table, "1.1.1l")
    assert old.s3_is_pointer is True
    assert (old.ssl_version, old.s3, old.session) == (0, 168, 1296)
    new = layout_of(table, "3.2.2")
    assert new.ssl_type == 0  # struct ssl_st is the first member of ssl_connection_st
    assert new.ssl_version > 0


def test_per_version_invariants(table: OffsetTable) -> None:
    for version in table.versions():
        lay = layout_of(table, version)
        key = vkey(version)
        assert lay.s3_is_pointer == (key < (3, 0, 0)), version
        assert (lay.ssl_type is not None) == (key >= (3, 2, 0)), version
        tls13 = key >= (1, 1, 1)
        for name in CONN_ARRAYS:
            assert (getattr(lay, name) is not None) == tls13, (version, name)
        assert lay.has_tls13 == tls13
        assert (lay.secret_size == 64) if tls13 else lay.secret_size is None
        # widths that changed type: master_key_length int -> size_t in 1.1.1,
        # SSL_CIPHER.id unsigned long -> uint32_t in 1.1.0
        assert lay.session_master_key_length_size == (8 if key >= (1, 1, 1) else 4), version
        assert lay.cipher_id_size == (4 if key >= (1, 1, 0) else 8), version
        assert lay.session_cipher_id_size == 8
        assert lay.master_key_size >= 48


def test_offsets_within_structs(table: OffsetTable) -> None:
    for version in table.versions():
        lay = layout_of(table, version)
        end = lay.ssl_size
        assert 0 <= lay.ssl_version + 4 <= end
        assert 0 <= lay.server + 4 <= end
        assert lay.session + 8 <= end
        assert lay.s3 + (8 if lay.s3_is_pointer else 64) <= end
        if not lay.s3_is_pointer:  # embedded: the randoms lie inside the connection too
            assert lay.s3 + lay.s3_client_random + 32 <= end
            assert lay.s3 + lay.s3_server_random + 32 <= end
        assert abs(lay.s3_client_random - lay.s3_server_random) >= 32
        for name in CONN_ARRAYS:
            off = getattr(lay, name)
            if off is not None:
                assert off + (lay.secret_size or 0) <= end, (version, name)
        arrays = sorted(o for o in (getattr(lay, n) for n in CONN_ARRAYS) if o is not None)
        for a, b in itertools.pairwise(arrays):
            assert b - a >= 64, version  # no overlap between the 64-byte arrays
        # SSL_SESSION: length before key, cipher pointer then cipher_id next to it
        assert lay.session_master_key_length < lay.session_master_key
        assert lay.session_cipher_id == lay.session_cipher + 8
        if lay.ssl_type is not None:
            assert lay.ssl_type < lay.ssl_version


def test_table_is_self_consistent(raw: dict[str, Any]) -> None:
    assert raw["generator"].startswith("tools/gen_offsets.py ")
    field_names = [f.name for f in dataclasses.fields(Layout)]
    for digest, body in raw["layouts"].items():
        assert list(body) == field_names
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
        assert hashlib.sha256(canon.encode()).hexdigest()[:12] == digest
    used = {v["layout"] for v in raw["versions"].values()}
    used |= {b["layout"] for b in raw["build_ids"].values()}
    assert used == set(raw["layouts"]), "layouts stored once and all referenced"
    for entry in raw["build_ids"].values():
        assert entry["version"] and entry["layout"] in raw["layouts"]


def test_cryptography_50_wheel_by_build_id(table: OffsetTable) -> None:
    # OpenSSL 4.0.3 (in the cryptography 50.0.2 wheel) has no tag in the source mirror, so it
    # is known by that binary's build id only, with the 4.0.x layout checked on the binary.
    wheel = "be9de4bceff2c10f1c8d6076bb42a5f016747d58"
    assert table.lookup("4.0.3") is None
    assert table.lookup("4.0.3", build_id=wheel) == table.lookup("4.0.1") is not None


def test_versions_sorted_and_lookup_spellings(table: OffsetTable) -> None:
    versions = table.versions()
    assert versions == sorted(versions, key=lambda v: (vkey(v), v))
    assert table.lookup("OpenSSL 3.0.19") == table.lookup("3.0.19")
    assert table.lookup("9.9.9") is None


def _mini_table(tmp_path: Path) -> Path:
    base = dataclasses.asdict(OffsetTable.load().lookup("3.0.19"))  # type: ignore[arg-type]
    other = dict(base, session=base["session"] + 8)
    data = {
        "generator": "test",
        "layouts": {"aaaa": base, "bbbb": other},
        "versions": {"3.0.19": {"tag": "openssl-3.0.19", "layout": "aaaa"}},
        "build_ids": {"ABCDEF0123": {"version": "3.0.19", "layout": "bbbb"}},
    }
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    return path


def test_lookup_prefers_build_id(tmp_path: Path) -> None:
    t = OffsetTable.load(_mini_table(tmp_path))
    by_version = t.lookup("3.0.19")
    by_build = t.lookup("3.0.19", build_id="abcdef0123")  # case-insensitive
    assert by_version is not None and by_build is not None
    assert by_build.session == by_version.session + 8
    assert t.lookup("3.0.19", build_id="ffff") == by_version  # unknown id: fall back
    assert t.lookup("1.0.0", build_id="abcdef0123") == by_build  # id alone is enough
    assert t.lookup("1.0.0") is None
    assert t.build_ids() == ["abcdef0123"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("layouts"), "layouts"),
        (lambda d: d.__setitem__("versions", []), "versions"),
        (lambda d: d["layouts"]["aaaa"].pop("session"), "missing field 'session'"),
        (lambda d: d["layouts"]["aaaa"].__setitem__("session", "0x918"), "'session'"),
        (lambda d: d["layouts"]["aaaa"].__setitem__("server", True), "'server'"),
        (lambda d: d["layouts"]["aaaa"].__setitem__("ssl_version", None), "'ssl_version'"),
        (lambda d: d["layouts"]["aaaa"].__setitem__("s3_is_pointer", 0), "'s3_is_pointer'"),
        (lambda d: d["versions"]["3.0.19"].__setitem__("layout", "zzzz"), "unknown layout"),
        (lambda d: d["build_ids"].__setitem__("x", {"layout": 3}), "layout"),
        (lambda d: d.__setitem__("build_ids", "none"), "build_ids"),
    ],
)
def test_malformed_tables(tmp_path: Path, mutate: Any, message: str) -> None:
    path = _mini_table(tmp_path)
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        OffsetTable.load(path)
    assert str(path) in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        OffsetTable.load(bad)
    with pytest.raises(ValueError, match="cannot read"):
        OffsetTable.load(tmp_path / "missing.json")
    bad.write_text("[]")
    with pytest.raises(ValueError, match="top level"):
        OffsetTable.load(bad)


def test_generator_tag_parsing() -> None:
    assert GENERATOR.tag_version("openssl-3.0.19") == "3.0.19"
    assert GENERATOR.tag_version("OpenSSL_1_1_1l") == "1.1.1l"
    assert GENERATOR.tag_version("OpenSSL_1_0_2") == "1.0.2"
    assert GENERATOR.tag_version("openssl-3.4.0-alpha1") is None
    assert GENERATOR.tag_version("OpenSSL_1_1_1-pre9") is None
    assert GENERATOR.tag_version("OpenSSL_1_0_2-post-reformat") is None
    assert list(GENERATOR.FIELDS) == [f.name for f in dataclasses.fields(Layout)]


# candidates for builds with no exact entry ---------------------------------------------------


def test_candidates_are_the_nearest_releases_each_layout_once(table: OffsetTable) -> None:
    candidates = table.candidates("3.2.9")  # a release the table does not have
    releases = [release for release, _ in candidates]
    layouts = [layout for _, layout in candidates]
    assert len(set(layouts)) == len(layouts) == len(set(table.layouts.values()))
    assert releases[0].startswith("3.2.")  # its own series first
    same_series = [r for r in releases if r.startswith("3.2.")]
    assert releases[:len(same_series)] == same_series
    # every distinct layout of the series comes before any other series'
    series_layouts = {table.lookup(v) for v in table.versions() if v.startswith("3.2.")}
    assert set(layouts[:len(series_layouts)]) == series_layouts


def test_candidates_of_a_release_whose_entry_was_removed_include_its_layout(
        table: OffsetTable) -> None:
    for version in ("3.2.4", "3.3.3", "3.4.1", "1.1.1l", "3.0.7"):
        right = table.lookup(version)
        data = json.loads(DEFAULT_PATH.read_text())
        del data["versions"][version]
        without = OffsetTable.from_dict(data)
        layouts = [layout for _, layout in without.candidates(version)]
        assert right in layouts[:4], version  # read at once with the first CANDIDATES


def test_layouts_that_read_the_same_bytes_take_one_place_among_the_candidates(
        table: OffsetTable, tmp_path: Path) -> None:
    """A layout that differs from a nearer one only in what the kernel does not read
    (ssl_size) would take one of the abi.CANDIDATES places and read the same keys again."""
    data = json.loads(DEFAULT_PATH.read_text())
    base = data["versions"]["3.4.0"]["layout"]
    data["layouts"]["twin"] = dict(data["layouts"][base],
                                   ssl_size=data["layouts"][base]["ssl_size"] + 8)
    data["versions"]["3.4.8"] = {"layout": "twin"}
    with_twin = OffsetTable.from_dict(data)
    nearest = with_twin.candidates("3.4.9")  # a release the table does not have
    assert nearest[0][0] == "3.4.8" and table.lookup("3.4.0") in [layout for _, layout in nearest]

    def read(layout: Layout) -> tuple:
        return tuple(getattr(layout, name) for name in LAYOUT_FIELDS)

    chosen = candidate_layouts(with_twin, "3.4.9", {})  # only the table's order: no machine code
    assert chosen[0][0] == "the layout of 3.4.8"  # the nearest of the twins keeps its place
    assert len({read(layout) for _, layout in chosen}) == len(chosen)
    assert {read(layout) for _, layout in chosen} == {read(layout) for _, layout in nearest}


def test_members_inserted_between_two_arrays_the_machine_code_shows(table: OffsetTable) -> None:
    """A patched build (quictls adds three 64-byte arrays to the SSL struct of Node.js's 3.0)
    under an upstream version: its machine code shows handshake_secret in place and the
    exporter secrets moved. The arrays in between, which it does not show, may have moved or
    not: each place the members may have gone in is a candidate (the ends of the gap first:
    all moved, or none), and the entry of that version (which contradicts the machine code)
    comes only after them."""
    entry = table.lookup("3.0.15")
    assert entry is not None
    moved = 192
    derived = {"session": entry.session + moved, "handshake_secret": entry.handshake_secret,
               "exporter_master_secret": entry.exporter_master_secret + moved,
               "early_exporter_master_secret": entry.early_exporter_master_secret + moved}
    chosen = candidate_layouts(table, "3.0.15", derived)
    read = ("handshake_traffic_hash", "client_app_traffic_secret", "server_app_traffic_secret")
    shifts = [tuple(getattr(layout, name) - getattr(entry, name) for name in read)
              for _, layout in chosen[:4]]
    assert shifts == [(moved, moved, moved), (0, 0, 0), (0, 0, moved), (0, moved, moved)]
    assert all(layout.session == entry.session + moved and layout.exporter_master_secret ==
               entry.exporter_master_secret + moved for _, layout in chosen[:4])
    assert [label for label, _ in chosen[:2]] == [
        "the layout of 3.0.15 adjusted to the build's machine code (moved from master_secret on)",
        "the layout of 3.0.15 adjusted to the build's machine code "
        "(moved from exporter_master_secret on)"]
    assert ("the layout of 3.0.15", entry) in chosen[4:]


def test_members_inserted_where_a_shared_library_shows_few_arrays(table: OffsetTable) -> None:
    """The same build as a shared libssl: its exports show only the early exporter secret
    among the arrays (moved), and `s3` before them (not moved). The right layout is among the
    first places read at once."""
    entry = table.lookup("3.0.15")
    assert entry is not None
    moved = 192
    derived = {"s3": entry.s3, "session": entry.session + moved,
               "early_exporter_master_secret": entry.early_exporter_master_secret + moved}
    right = dataclasses.replace(entry, session=entry.session + moved,
                                exporter_master_secret=entry.exporter_master_secret + moved,
                                early_exporter_master_secret=entry.early_exporter_master_secret
                                + moved)
    read = [tuple(getattr(layout, name) for name in LAYOUT_FIELDS)
            for _, layout in candidate_layouts(table, "3.0.15", derived)[:CANDIDATES]]
    assert tuple(getattr(right, name) for name in LAYOUT_FIELDS) in read


def test_no_candidates_for_an_unparsable_version(table: OffsetTable) -> None:
    assert table.candidates("") == [] and table.candidates("garbage") == []
