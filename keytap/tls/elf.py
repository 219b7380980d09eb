"""The few parts of an ELF file keytap reads: headers, named sections, build id, DT_NEEDED.

Written by hand on `struct` because inspecting a file is on the launch gate's clock (a task
waits in open() meanwhile, sources.launches): pyelftools builds every section object on
iter_sections() or get_section_by_name(), a GNU hash section parses its whole table, and its
construct-based parsers cost ~5 ms for a libssl/libcrypto pair even reading headers only. These
are fixed-layout records (ELF gABI), ~0.2 ms this way. pyelftools stays for everything else.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

SHT_SYMTAB, SHT_DYNAMIC, SHT_NOTE, SHT_NOBITS, SHT_DYNSYM = 2, 6, 7, 8, 11
PT_LOAD = 1
PF_X = 1
NT_GNU_BUILD_ID = 3
DT_NEEDED, DT_RPATH, DT_RUNPATH = 1, 15, 29
MACHINES = {3: "EM_386", 40: "EM_ARM", 62: "EM_X86_64", 183: "EM_AARCH64"}


class ElfError(ValueError):
    """Not an ELF file, or one whose headers point outside it."""


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    type: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int


@dataclass(frozen=True, slots=True)
class Load:
    """A PT_LOAD program header."""

    vaddr: int
    filesz: int
    offset: int
    flags: int


class ElfHeaders:
    """An ELF file's section and PT_LOAD headers; section bytes read on demand."""

    def __init__(self, stream: BinaryIO) -> None:
        self._fd = stream.fileno()
        ident = os.pread(self._fd, 64, 0)
        if len(ident) < 52 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
            raise ElfError("not an ELF file")
        self.elfclass = 64 if ident[4] == 2 else 32
        self.little_endian = ident[5] == 1
        order = "<" if self.little_endian else ">"
        wide = self.elfclass == 64
        header = struct.unpack_from(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"),
                                    ident, 16)
        machine, phoff, shoff = header[1], header[4], header[5]
        phentsize, phnum, shentsize, shnum, shstrndx = header[8:13]
        self.machine = MACHINES.get(machine, f"EM_{machine}")
        shdr = struct.Struct(order + ("IIQQQQIIQQ" if wide else "IIIIIIIIII"))
        phdr = struct.Struct(order + ("IIQQQQQQ" if wide else "IIIIIIII"))
        if (shnum and shentsize < shdr.size) or (phnum and phentsize < phdr.size):
            raise ElfError("header entries too small")
        table = self._read(shoff, shnum * shentsize)  # one read: every syscall can cost a
        # GIL handoff on the launch gate's clock
        raw = [shdr.unpack_from(table, i * shentsize) for i in range(shnum)]
        # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
        names = self._read(raw[shstrndx][4], raw[shstrndx][5]) if shstrndx < shnum else b""
        self.sections = [
            Section(_string(names, r[0]), r[1], r[3], r[4], r[5], r[6], r[9]) for r in raw]
        self._by_name = {s.name: s for s in reversed(self.sections)}
        self.loads: list[Load] = []
        table = self._read(phoff, phnum * phentsize)
        for i in range(phnum):
            p = phdr.unpack_from(table, i * phentsize)
            if p[0] == PT_LOAD:  # 64: type flags offset vaddr paddr filesz; 32: type offset vaddr
                self.loads.append(Load(p[3], p[5], p[2], p[1]) if wide
                                  else Load(p[2], p[4], p[1], p[6]))

    def _read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise ElfError(f"truncated at {offset:#x}")
        return data

    def file_offset(self, address: int) -> int | None:
        """Where virtual `address` is in the file: in the PT_LOAD segment holding it."""
        for load in self.loads:
            if load.vaddr <= address < load.vaddr + load.filesz:
                return load.offset + address - load.vaddr
        return None

    def section(self, name: str) -> Section | None:
        return self._by_name.get(name)

    def of_type(self, *types: int) -> list[Section]:
        return [s for s in self.sections if s.type in types]

    def data(self, section: Section | str | None) -> bytes:
        """A section's bytes (empty when absent or SHT_NOBITS)."""
        if isinstance(section, str):
            section = self.section(section)
        if section is None or section.type == SHT_NOBITS:
            return b""
        return self._read(section.offset, section.size)

    def build_id(self) -> str | None:
        """The NT_GNU_BUILD_ID note's bytes in hex."""
        order = "<" if self.little_endian else ">"
        for section in self.of_type(SHT_NOTE):
            notes, at = self.data(section), 0
            while at + 12 <= len(notes):
                namesz, descsz, kind = struct.unpack_from(order + "III", notes, at)
                desc = at + 12 + _align4(namesz)
                if kind == NT_GNU_BUILD_ID and notes[at + 12:at + 15] == b"GNU":
                    return notes[desc:desc + descsz].hex()
                at = desc + _align4(descsz)
        return None

    def dynamic(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """DT_NEEDED names, and DT_RUNPATH/DT_RPATH directories."""
        section = self.section(".dynamic")
        if section is None or section.type != SHT_DYNAMIC or section.link >= len(self.sections):
            return (), ()
        strings = self.data(self.sections[section.link])
        entry = struct.Struct(("<" if self.little_endian else ">")
                              + ("qQ" if self.elfclass == 64 else "iI"))
        needed: list[str] = []
        runpath: list[str] = []
        for tag, value in entry.iter_unpack(self.data(section)[:section.size
                                                               // entry.size * entry.size]):
            if tag == DT_NEEDED:
                needed.append(_string(strings, value))
            elif tag in (DT_RUNPATH, DT_RPATH):
                runpath.extend(p for p in _string(strings, value).split(":") if p)
        return tuple(needed), tuple(runpath)


def _string(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    return table[offset:end if end >= 0 else len(table)].decode(errors="replace")


def _align4(n: int) -> int:
    return (n + 3) & ~3
