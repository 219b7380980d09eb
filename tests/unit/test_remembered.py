"""tls.remembered: proven layouts kept by build id, owner-only, replaced atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from keytap.tls.offsets import OffsetTable
from keytap.tls.remembered import FILE_NAME, RememberedLayouts

BUILD = "AB:CD:01"


@pytest.fixture(scope="module")
def layout():
    return OffsetTable.load().lookup("3.0.22")


def test_a_remembered_layout_is_found_by_the_next_capture(tmp_path: Path, layout) -> None:
    path = tmp_path / "cache" / FILE_NAME
    RememberedLayouts(path).remember(BUILD, "3.0.99", layout, ["1.3"])
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    again = RememberedLayouts(path)
    assert again.lookup("abcd01") == (layout, ("1.3",))  # build ids compare normalized
    assert again.lookup("ffff") is None and again.lookup(None) is None
    assert [p.name for p in path.parent.iterdir()] == [FILE_NAME]  # no temporary left behind


def test_a_file_others_can_write_or_a_symlink_is_not_trusted(tmp_path: Path, layout) -> None:
    path = tmp_path / FILE_NAME
    RememberedLayouts(path).remember(BUILD, "3.0.99", layout, ["1.3"])
    path.chmod(0o666)
    assert RememberedLayouts(path).lookup(BUILD) is None
    path.chmod(0o600)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    assert RememberedLayouts(link).lookup(BUILD) is None


def test_garbage_is_ignored_and_replaced(tmp_path: Path, layout) -> None:
    path = tmp_path / FILE_NAME
    path.write_text("{not json")
    os.chmod(path, 0o600)
    remembered = RememberedLayouts(path)
    assert remembered.lookup(BUILD) is None
    remembered.remember(BUILD, None, layout, ["1.2", "1.3"])
    assert set(json.loads(path.read_text())["build_ids"]) == {"abcd01"}
