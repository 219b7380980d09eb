"""Go binaries with crypto/tls: their Go version and where `(*Config).writeKeyLog` is.

Go's crypto/tls calls `(*Config).writeKeyLog(label, clientRandom, secret)` for every secret
of every handshake, KeyLogWriter set or not, so one entry uprobe there sees them all. Go
binaries are static and often stripped (`-ldflags="-s -w"` drops .symtab), but the runtime
needs its function table (pclntab) to unwind stacks, so every Go binary carries it: in
`.gopclntab`, in `.data.rel.ro.gopclntab` for internally linked PIE builds, or unnamed inside
`.data.rel.ro`/`.rodata` when an external linker merged the sections (found by its magic).
The Go version comes from the build info (`.go.buildinfo`), which also says the file is Go.

The pclntab parser is written here by hand: no package on PyPI parses it well (the known ones
are unmaintained or pull in a disassembler), and keytap needs three fields of it: the
function names, their entry addresses, and the next function's entry. Formats: Go 1.2-1.15
(magic 0xfffffffb), 1.16-1.17 (0xfffffffa), 1.18-1.19 (0xfffffff0) and 1.20+ (0xfffffff1).

Besides the function, the address ranges of crypto/tls's client and server handshake code:
the return address of a writeKeyLog call falls in one of them, which tells the role (the
arguments do not: `clientRandom` is the ClientHello's random in both roles).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

from keytap.tls.elf import ElfHeaders

KEYLOG_FUNCTION = "crypto/tls.(*Config).writeKeyLog"
BUILDINFO_MAGIC = b"\xff Go buildinf:"
REGABI_SINCE = (1, 17)  # amd64 passes arguments in registers from Go 1.17 on

_PCLNTAB_MAGICS = {0xFFFFFFFB: "1.2", 0xFFFFFFFA: "1.16", 0xFFFFFFF0: "1.18",
                   0xFFFFFFF1: "1.20"}
_PCLNTAB_SECTIONS = (".gopclntab", ".data.rel.ro.gopclntab")
_SEARCHED_SECTIONS = (".data.rel.ro", ".rodata", ".noptrdata")  # external linking merges
_TLS_NAMES = re.compile(rb"\x00(crypto/tls\.[^\x00]*)")
_ROLE = re.compile(r"(client|server)", re.IGNORECASE)
_GO_VERSION = re.compile(r"go(\d+)\.(\d+)")


@dataclass(frozen=True)
class GoBuild:
    """What keytap needs of one Go binary: its version and where to probe."""

    version: str | None  # "go1.19.8"; None when the build info cannot be read
    keylog_address: int | None  # writeKeyLog's virtual address; None when not found
    reason: str = ""  # why it was not found
    keylog_offset: int | None = None  # its file offset, which a uprobe takes
    roles: tuple[tuple[int, int, bool], ...] = field(default=(), hash=False)  # (start, end,
    # server) of crypto/tls's handshake functions, sorted by start

    @property
    def register_abi(self) -> bool | None:
        """Whether arguments come in registers (amd64, Go 1.17+); None if the version is
        unknown."""
        found = _GO_VERSION.match(self.version or "")
        return None if found is None else (int(found[1]), int(found[2])) >= REGABI_SINCE

    def role_of(self, address: int) -> bool | None:
        """True (server) or False (client) for a return address in crypto/tls's handshake
        code, None elsewhere."""
        low, high = 0, len(self.roles)
        while low < high:
            middle = (low + high) // 2
            if self.roles[middle][0] <= address:
                low = middle + 1
            else:
                high = middle
        if low and address < self.roles[low - 1][1]:
            return self.roles[low - 1][2]
        return None


def inspect_go(headers: ElfHeaders, fd: int) -> GoBuild | None:
    """A GoBuild if the ELF file open as `fd` is a Go binary that contains crypto/tls, else
    None."""
    if headers.section(".go.buildinfo") is None:
        return None
    version = buildinfo_version(headers.data(".go.buildinfo"),
                                lambda address, size: _read(headers, fd, address, size))
    table = _find_pclntab(headers)
    if table is None:
        return GoBuild(version, None, "no function table (pclntab) found")
    data, text_start = table
    try:
        functions = parse_pclntab(data, text_start)
    except (struct.error, ValueError, IndexError) as error:
        return GoBuild(version, None, f"its function table could not be read ({error})")
    if not any(name.startswith("crypto/tls.") for name, _, _ in functions):
        return None
    entry = next((start for name, start, _ in functions if name == KEYLOG_FUNCTION), None)
    roles = tuple(sorted(
        (start, end, found[1].lower() == "server") for name, start, end in functions
        if name.startswith("crypto/tls.") and (found := _ROLE.search(name)) is not None))
    if entry is None:
        return GoBuild(version, None, f"no {KEYLOG_FUNCTION} in its function table", roles)
    offset = headers.file_offset(entry)
    if offset is None:
        return GoBuild(version, None, f"{KEYLOG_FUNCTION} is in no loaded segment", roles)
    return GoBuild(version, entry, roles=roles, keylog_offset=offset)


def buildinfo_version(data: bytes, read) -> str | None:
    """The Go version in a `.go.buildinfo` section: inline (Go 1.18+) or behind two pointers
    (earlier); `read(address, size)` reads the file's memory image."""
    if not data.startswith(BUILDINFO_MAGIC) or len(data) < 32:
        return None
    pointer_size, flags = data[14], data[15]
    if flags & 2:  # 1.18+: varint length + bytes, right after the 32-byte header
        length, position = _uvarint(data, 32)
        return data[position:position + length].decode(errors="replace") or None
    order = ">" if flags & 1 else "<"
    word = order + ("Q" if pointer_size == 8 else "I")
    header = read(struct.unpack_from(word, data, 16)[0], 2 * pointer_size)
    if header is None or len(header) < 2 * pointer_size:
        return None
    address, length = struct.unpack(order + word[1] * 2, header)
    text = read(address, length) if 0 < length < 64 else None
    return text.decode(errors="replace") if text else None


def parse_pclntab(data: bytes, text_start: int) -> list[tuple[str, int, int]]:
    """(name, entry address, end address) of every function in a pclntab whose crypto/tls
    functions are wanted: only names starting with "crypto/tls." are decoded.

    `text_start` stands in for the header's own when that reads 0 (a relocated field).
    Raises ValueError on a table it does not know, struct.error when it is cut short.
    """
    magic = struct.unpack_from("<I", data)[0]
    format_ = _PCLNTAB_MAGICS.get(magic)
    if format_ is None or data[4:6] != b"\0\0" or data[7] not in (4, 8):
        raise ValueError(f"unknown pclntab header {data[:8].hex()}")
    size = data[7]
    word = "<Q" if size == 8 else "<I"

    def header(index: int) -> int:
        return struct.unpack_from(word, data, 8 + index * size)[0]

    nfunc = header(0)
    if format_ == "1.2":
        names_base, functab = 0, 8 + size
        entry_size, text = 2 * size, 0
    else:
        fields = 8 if format_ in ("1.18", "1.20") else 7
        if fields == 8:
            text = header(2) or text_start
            names_base, functab = header(3), header(7)
        else:
            text, names_base, functab = 0, header(2), header(6)
        entry_size = 8 if fields == 8 else 2 * size
    names_end = len(data) if format_ == "1.2" else header(fields - 4)  # cuOffset
    wanted = {match.start(1) - names_base: match[1].decode(errors="replace")
              for match in _TLS_NAMES.finditer(data, names_base - 1 if names_base else 0,
                                               names_end)}
    entry_format = "<II" if entry_size == 8 else ("<QQ" if size == 8 else "<II")
    entries = list(struct.iter_unpack(
        entry_format, data[functab:functab + (nfunc + 1) * entry_size]))
    if len(entries) != nfunc + 1:
        raise ValueError("pclntab function table is cut short")
    func_base = 0 if format_ == "1.2" else functab
    name_offset = 4 if entry_size == 8 else size  # _func: entry (u32 or uintptr), nameOff
    functions = []
    for index in range(nfunc):
        entry, func_offset = entries[index]
        name = wanted.get(struct.unpack_from("<i", data, func_base + func_offset
                                             + name_offset)[0])
        if name is not None:
            functions.append((name, text + entry, text + entries[index + 1][0]))
    return functions


def _find_pclntab(headers: ElfHeaders) -> tuple[bytes, int] | None:
    """The pclntab's bytes (from its start to its section's end) and .text's address."""
    text = headers.section(".text")
    text_start = text.addr if text is not None else 0
    for name in _PCLNTAB_SECTIONS:
        if data := headers.data(name):
            return data, text_start
    for name in _SEARCHED_SECTIONS:
        data = headers.data(name)
        for magic in _PCLNTAB_MAGICS:
            pattern = struct.pack("<I", magic) + b"\0\0"
            position = data.find(pattern)
            while position >= 0:
                if position % 8 == 0 and data[position + 6] in (1, 2, 4) and \
                        data[position + 7] in (4, 8):
                    candidate = data[position:]
                    try:
                        if parse_pclntab(candidate, text_start):
                            return candidate, text_start
                    except (struct.error, ValueError, IndexError):
                        pass
                position = data.find(pattern, position + 1)
    return None


def _read(headers: ElfHeaders, fd: int, address: int, size: int) -> bytes | None:
    """`size` bytes at virtual `address`, from the PT_LOAD segment holding them."""
    offset = headers.file_offset(address)
    return None if offset is None else os.pread(fd, size, offset)


def _uvarint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
