"""keytap.tls.elf against pyelftools on this machine's own ELF files."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from keytap.tls.elf import ElfError, ElfHeaders

FILES = [Path(p) for p in (sys.executable, "/bin/true",
                           *glob.glob("/usr/lib/x86_64-linux-gnu/libssl.so.3"))]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_agrees_with_pyelftools(path: Path) -> None:
    with path.open("rb") as stream:
        ours, theirs = ElfHeaders(stream), ELFFile(stream)
        assert [(s.name, s.offset, s.size, s.link) for s in ours.sections] == [
            (s.name, s["sh_offset"], s["sh_size"], s["sh_link"]) for s in theirs.iter_sections()]
        assert [(p.vaddr, p.filesz, p.offset, p.flags) for p in ours.loads] == [
            (p["p_vaddr"], p["p_filesz"], p["p_offset"], p["p_flags"])
            for p in theirs.iter_segments() if p["p_type"] == "PT_LOAD"]
        assert ours.machine == theirs["e_machine"]
        notes = [n for s in theirs.iter_sections() if s["sh_type"] == "SHT_NOTE"
                 for n in s.iter_notes() if n["n_type"] == "NT_GNU_BUILD_ID"]
        assert ours.build_id() == (notes[0]["n_desc"] if notes else None)
        dynamic = theirs.get_section_by_name(".dynamic")
        needed = tuple(t.needed for t in dynamic.iter_tags() if t.entry.d_tag == "DT_NEEDED")
        assert ours.dynamic()[0] == needed and needed
        assert ours.data(".rodata") == theirs.get_section_by_name(".rodata").data()


def test_not_elf_and_truncated(tmp_path: Path) -> None:
    head = FILES[0].read_bytes()[:200]  # the ELF header, but its section headers are cut off
    for name, data in (("script", b"#!/bin/sh\n" * 10), ("cut", head)):
        (tmp_path / name).write_bytes(data)
        with (tmp_path / name).open("rb") as stream, pytest.raises(ElfError):
            ElfHeaders(stream)
