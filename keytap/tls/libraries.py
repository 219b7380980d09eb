"""Identify a TLS library file (flavor, version, uprobe offsets) without running any of its code.

keytap attaches uprobes to files that belong to other processes, possibly in other containers,
so everything here is read from the ELF file: symbol tables, the program headers, the build-id
note, `.rodata` strings and the few machine-code bytes of `OpenSSL_version_num()`.

Design of the result for a dynamically linked OpenSSL: the TLS functions (`SSL_*`) live in
libssl and `EVP_PKEY_derive` lives in libcrypto, so a `TlsLibrary` describes libssl (`path`,
`symbols`) and carries the libcrypto it uses in `crypto_path`/`crypto_symbols`. Each mapping
holds file offsets valid only in its own file; `uprobe_targets()` merges them into
"symbol -> (file, offset)" for callers that only want to attach. For a statically linked
OpenSSL everything is in `path`/`symbols` and `crypto_path` is None.
"""

from __future__ import annotations

import enum
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from keytap.tls.elf import SHT_DYNSYM, SHT_SYMTAB, ElfError, ElfHeaders, Section
from keytap.tls.golang import GoBuild, inspect_go

# The functions keytap probes; SSL_get_version is optional (only recorded when present).
# Secrets are read when SSL_do_handshake returns (explicit handshakes) and at the entry of the
# CALL_SYMBOLS: the first I/O after an implicit handshake (SSL_write first, BIO_f_ssl) and
# SSL_free, the last chance. Not at SSL_in_init, which libssl calls ~15 times per connection: a
# uprobe hit costs up to ~10 us inside a VM (docs/DESIGN.md). The _ex forms exist from 1.1.1 on.
CALL_SYMBOLS = ("SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex", "SSL_free")
SSL_SYMBOLS = ("SSL_do_handshake", *CALL_SYMBOLS, "SSL_get_version")
REQUIRED_SYMBOLS = ("SSL_do_handshake", "SSL_read", "SSL_write", "SSL_free")
CRYPTO_SYMBOLS = ("EVP_PKEY_derive",)
PROBE_SYMBOLS = SSL_SYMBOLS + CRYPTO_SYMBOLS

_ANCHOR = "SSL_do_handshake"  # a file that defines it implements the OpenSSL TLS API
# OpenSSL_version_num() exists since 1.1.0; SSLeay() is the same function in 1.0.x.
_VERSION_FUNCTIONS = ("OpenSSL_version_num", "SSLeay")
_BORINGSSL_SYMBOLS = ("BORINGSSL_self_test", "SSL_CTX_set_grease_enabled")

# "OpenSSL 3.0.19 27 Jan 2026", "OpenSSL 1.1.1l  24 Aug 2021", "OpenSSL 3.2.0-fips 23 Nov 2023";
# the date keeps BoringSSL's "OpenSSL 1.1.1 (compatible; BoringSSL)" out.
_OPENSSL_BANNER = re.compile(
    rb"OpenSSL (\d+\.\d+\.\d+[a-z]{0,2})(?:-[\w.]+)? +\d{1,2} [A-Z][a-z]{2} \d{4}\x00"
)
_LIBRESSL_BANNER = re.compile(rb"(?:\A|\x00)LibreSSL (\d+\.\d+\.\d+)\x00")
_BORINGSSL_STRINGS = (b"\x00BoringSSL\x00", b"(compatible; BoringSSL)")

_PROC_ROOT = re.compile(r"^(/proc/\d+/root)(/.*)?$")
_LIB_DIRS = (
    "/lib/{multiarch}",
    "/usr/lib/{multiarch}",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib64",
    "/usr/local/lib",
)
_MULTIARCH = {"EM_X86_64": "x86_64-linux-gnu", "EM_AARCH64": "aarch64-linux-gnu"}

_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_STB_LOCAL = 0
_SHN_UNDEF = 0


class Flavor(enum.Enum):
    """Which TLS implementation; of the OpenSSL API's only OPENSSL is supported so far."""

    OPENSSL = "OpenSSL"
    BORINGSSL = "BoringSSL"
    LIBRESSL = "LibreSSL"
    GO = "Go"  # not the OpenSSL API: Go's crypto/tls, probed at writeKeyLog (tls.golang)


class Linkage(enum.Enum):
    """DYNAMIC: libssl + libcrypto shared objects; STATIC: both built into one file."""

    DYNAMIC = "dynamic"
    STATIC = "static"


@dataclass(frozen=True, slots=True)
class UprobeTarget:
    """Where to put a uprobe: a file and an offset into that file (not a virtual address)."""

    path: Path
    offset: int


@dataclass(frozen=True)
class TlsLibrary:
    """A file implementing the OpenSSL TLS API, described well enough to attach uprobes to it.

    `path` is the file as reachable from keytap's mount namespace (e.g. /proc/PID/root/usr/...);
    `display_path` is what the traced process calls it. `symbols` maps each probe symbol found
    in `path` to its file offset. For DYNAMIC linkage `EVP_PKEY_derive` is in libcrypto:
    `crypto_path` and `crypto_symbols` (offsets into `crypto_path`); `version` then comes from
    libcrypto because a 3.x libssl does not contain it.
    """

    path: Path
    display_path: str
    flavor: Flavor
    version: str | None
    linkage: Linkage
    build_id: str | None
    symbols: Mapping[str, int] = field(hash=False)
    crypto_path: Path | None = None
    crypto_display_path: str | None = None
    crypto_build_id: str | None = None
    crypto_symbols: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    go: GoBuild | None = None  # Flavor.GO: its Go version and where writeKeyLog is

    def uprobe_targets(self) -> dict[str, UprobeTarget]:
        """Every probe symbol found, with the file it lives in and its offset there."""
        targets = {name: UprobeTarget(self.path, off) for name, off in self.symbols.items()}
        if self.crypto_path is not None:
            for name, off in self.crypto_symbols.items():
                targets.setdefault(name, UprobeTarget(self.crypto_path, off))
        return targets

    @property
    def call_symbols(self) -> tuple[str, ...]:
        """The CALL_SYMBOLS this build has (see above)."""
        return tuple(name for name in CALL_SYMBOLS if name in self.symbols)

    @property
    def missing_symbols(self) -> tuple[str, ...]:
        """Required probe symbols that were not found (SSL_get_version is optional)."""
        found = self.uprobe_targets().keys()
        return tuple(s for s in REQUIRED_SYMBOLS if s not in found)


# A resolver maps a DT_NEEDED name ("libcrypto.so.3") to (path to open, path the process sees).
NeededResolver = Callable[[str], tuple[Path, str] | None]


def inspect_library(
    path: Path,
    display_path: str | None = None,
    *,
    resolve_needed: NeededResolver | None = None,
) -> TlsLibrary | None:
    """Describe `path` if it defines the OpenSSL TLS API (SSL_do_handshake) or is a Go binary
    with crypto/tls (Flavor.GO), else None.

    For a dynamic libssl, its libcrypto is found through `resolve_needed` (discovery passes the
    one the process has mapped) or else like the dynamic linker would: RUNPATH/RPATH, the same
    directory, then the usual library directories, all inside the root `path` lives under
    (/proc/PID/root when `path` starts with it). Raises OSError if `path` cannot be read.
    """
    path = Path(path)
    if display_path is None:
        display_path = _display_of(path)
    with open(path, "rb") as stream:
        main = _ElfScan.open(stream)
        if main is None:
            return None
        syms = main.symbols(PROBE_SYMBOLS + _VERSION_FUNCTIONS)
        if _ANCHOR not in syms:
            go = inspect_go(main.headers, stream.fileno())
            if go is None:
                return None
            return TlsLibrary(path=path, display_path=display_path, flavor=Flavor.GO,
                              version=go.version, linkage=Linkage.STATIC,
                              build_id=main.headers.build_id(),
                              symbols=MappingProxyType({}), go=go)
        boring_syms = main.symbols(_BORINGSSL_SYMBOLS)
        main_facts = main.facts(syms, boring_syms)

    if "EVP_PKEY_derive" in syms:  # libssl and libcrypto code in one file
        return TlsLibrary(
            path=path,
            display_path=display_path,
            flavor=main_facts.flavor,
            version=main_facts.version,
            linkage=Linkage.STATIC,
            build_id=main_facts.build_id,
            symbols=MappingProxyType({n: syms[n] for n in PROBE_SYMBOLS if n in syms}),
        )

    crypto = _find_crypto(path, display_path, main_facts, resolve_needed)
    crypto_facts: _Facts | None = None
    crypto_syms: dict[str, int] = {}
    if crypto is not None:
        crypto_facts, crypto_syms = _inspect_crypto(crypto[0])
    flavor, version = main_facts.flavor, main_facts.version
    if crypto_facts is not None:
        if flavor is Flavor.OPENSSL:
            flavor = crypto_facts.flavor
        version = crypto_facts.version or version
    return TlsLibrary(
        path=path,
        display_path=display_path,
        flavor=flavor,
        version=version,
        linkage=Linkage.DYNAMIC,
        build_id=main_facts.build_id,
        symbols=MappingProxyType({n: syms[n] for n in SSL_SYMBOLS if n in syms}),
        crypto_path=crypto[0] if crypto_facts is not None else None,
        crypto_display_path=crypto[1] if crypto_facts is not None else None,
        crypto_build_id=crypto_facts.build_id if crypto_facts is not None else None,
        crypto_symbols=MappingProxyType(
            {n: crypto_syms[n] for n in CRYPTO_SYMBOLS if n in crypto_syms}
        ),
    )


def decode_version_number(number: int) -> str | None:
    """Turn OPENSSL_VERSION_NUMBER into "1.1.1l" / "3.0.19"; None for LibreSSL's 0x20000000.

    Up to 1.x it is 0xMNNFFPPS (PP = patch letter a..z, S = 0xf for a release); from 3.0 on
    it is major<<28 | minor<<20 | patch<<4. None also for letters past "z" (premium releases).
    """
    major = number >> 28
    if major >= 3:
        return f"{major}.{(number >> 20) & 0xFF}.{(number >> 4) & 0xFFFF}"
    if major != 1 and number >> 20 != 0x009:  # 2.x is LibreSSL's constant, not a version
        return None
    minor, fix, patch, status = (
        (number >> 20) & 0xFF,
        (number >> 12) & 0xFF,
        (number >> 4) & 0xFF,
        number & 0xF,
    )
    if patch > 26:  # 1.0.2za and later: letter encoding not documented, let the banner say
        return None
    letters = chr(ord("a") + patch - 1) if patch else ""
    suffix = "" if status == 0xF else "-dev" if status == 0 else f"-beta{status}"
    return f"{major}.{minor}.{fix}{letters}{suffix}"


def decode_version_function(code: bytes, machine: str) -> int | None:
    """The constant returned by a `return CONSTANT;` function's machine code, if recognised."""
    if machine in ("EM_X86_64", "EM_386"):
        for prefix in (b"\xf3\x0f\x1e\xfa", b"\xf3\x0f\x1e\xfb"):  # endbr64 / endbr32
            code = code.removeprefix(prefix)
        if code[:1] == b"\xb8" and code[5:6] == b"\xc3":  # mov eax, imm32; ret
            return int.from_bytes(code[1:5], "little")
        frame = b"\x55\x48\x89\xe5"  # push rbp; mov rbp, rsp (unoptimised builds)
        if code.startswith(frame) and code[4:5] == b"\xb8" and code[9:11] == b"\x5d\xc3":
            return int.from_bytes(code[5:9], "little")
        return None
    if machine == "EM_AARCH64":
        # movz x0|w0, #imm{, lsl #16*hw} ; [movk x0|w0, #imm, lsl #16*hw] ; ret
        words = struct.unpack_from(f"<{len(code) // 4}I", code)
        value = None
        for word in words[1:] if words[:1] == (0xD503245F,) else words:  # skip "bti c"
            shift = 16 * ((word >> 21) & 3)
            imm = ((word >> 5) & 0xFFFF) << shift
            if word & 0x7F80001F == 0x52800000:  # movz into register 0
                value = imm
            elif word & 0x7F80001F == 0x72800000 and value is not None:  # movk into register 0
                value = value & ~(0xFFFF << shift) | imm
            elif word == 0xD65F03C0 and value is not None:  # ret
                return value
            else:
                return None
    return None


# --- internals -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Facts:
    """What one ELF file says about itself (flavor/version as far as this file can tell)."""

    flavor: Flavor
    version: str | None
    build_id: str | None
    needed: tuple[str, ...]
    runpath: tuple[str, ...]
    machine: str


class _ElfScan:
    """One open ELF file; reads only the sections it needs, symbol tables as raw bytes."""

    def __init__(self, stream: BinaryIO, headers: ElfHeaders) -> None:
        self._stream = stream
        self._headers = headers
        self._loads = [(s.vaddr, s.filesz, s.offset) for s in headers.loads]
        little = headers.little_endian
        if headers.elfclass == 64:
            self._sym = struct.Struct("<IBBHQQ" if little else ">IBBHQQ")
            self._layout = (1, 3, 4)  # indexes of info, shndx, value
        else:
            self._sym = struct.Struct("<IIIBBH" if little else ">IIIBBH")
            self._layout = (3, 5, 1)
        self._tables = headers.of_type(SHT_DYNSYM, SHT_SYMTAB)
        self._tables.sort(key=lambda s: s.type != SHT_DYNSYM)  # exported ones first
        self._strtabs: dict[int, bytes] = {}

    @property
    def headers(self) -> ElfHeaders:
        return self._headers

    @classmethod
    def open(cls, stream: BinaryIO) -> _ElfScan | None:
        """None for files that are not ELF (or too broken to read)."""
        if stream.read(4) != b"\x7fELF":
            return None
        stream.seek(0)
        try:
            return cls(stream, ElfHeaders(stream))
        except (ElfError, struct.error):
            return None

    def symbols(self, names: Iterable[str]) -> dict[str, int]:
        """File offsets of the defined functions among `names` (.dynsym first, then .symtab)."""
        found: dict[str, int] = {}
        wanted = [n for n in names]
        for table in self._tables:
            missing = [n for n in wanted if n not in found]
            if not missing:
                break
            strtab = self._strtab(table.link)
            # st_name offsets that spell each name; string tables may share tails, so every
            # occurrence counts, not only those right after a NUL.
            by_offset: dict[int, str] = {}
            for name in missing:
                needle = name.encode() + b"\0"
                pos = strtab.find(needle)
                while pos >= 0:
                    by_offset[pos] = name
                    pos = strtab.find(needle, pos + 1)
            if by_offset:
                found.update(self._scan_table(table, by_offset, found))
        return found

    def _scan_table(self, table: Section, by_offset: dict[int, str],
                    known: dict[str, int]) -> dict[str, int]:
        info_i, shndx_i, value_i = self._layout
        best: dict[str, tuple[bool, int]] = {}  # name -> (is_global, vaddr)
        for name, entry in self._entries_named(self._headers.data(table), by_offset):
            if name in known:
                continue
            info, value = entry[info_i], entry[value_i]
            if entry[shndx_i] == _SHN_UNDEF or not value:
                continue
            if info & 0xF not in (_STT_FUNC, _STT_GNU_IFUNC):
                continue
            is_global = info >> 4 != _STB_LOCAL
            if name not in best or (is_global and not best[name][0]):
                best[name] = (is_global, value)
        result = {}
        for name, (_, vaddr) in best.items():
            offset = self.file_offset(vaddr)
            if offset is not None:
                result[name] = offset
        return result

    def _entries_named(self, data: bytes,
                       by_offset: dict[int, str]) -> Iterator[tuple[str, tuple[int, ...]]]:
        """The symbol entries whose st_name is one of `by_offset`: found by searching the
        table for that st_name's bytes at entry boundaries (a few C-speed finds instead of
        unpacking a libcrypto's 10,000 entries in Python). st_name is the entry's first
        field in both ELF classes."""
        size, order = self._sym.size, self._sym.format[0]
        for st_name, name in by_offset.items():
            needle = struct.pack(order + "I", st_name)
            at = data.find(needle)
            while at >= 0:
                if at % size == 0 and at + size <= len(data):
                    yield name, self._sym.unpack_from(data, at)
                at = data.find(needle, at + 1)

    def _strtab(self, index: int) -> bytes:
        if index not in self._strtabs:
            self._strtabs[index] = self._headers.data(self._headers.sections[index])
        return self._strtabs[index]

    def file_offset(self, vaddr: int) -> int | None:
        """vaddr -> offset in the file, through the PT_LOAD segment that contains it."""
        for seg_vaddr, filesz, offset in self._loads:
            if seg_vaddr <= vaddr < seg_vaddr + filesz:
                return vaddr - seg_vaddr + offset
        return None

    def read_at(self, offset: int, size: int) -> bytes:
        self._stream.seek(offset)
        return self._stream.read(size)

    def facts(self, syms: Mapping[str, int], boring_syms: Mapping[str, int]) -> _Facts:
        """Flavor and version from the version function and .rodata, plus linking metadata."""
        machine = self._headers.machine
        number = None
        for fn in _VERSION_FUNCTIONS:
            if fn in syms:
                number = decode_version_function(self.read_at(syms[fn], 16), machine)
                if number is not None:
                    break
        rodata = self._rodata()
        flavor, version = Flavor.OPENSSL, None
        if (
            boring_syms
            or rodata.startswith(b"BoringSSL\0")
            or any(s in rodata for s in _BORINGSSL_STRINGS)
        ):
            flavor = Flavor.BORINGSSL  # claims to be 1.1.1 but has no releases
        elif b"LibreSSL " in rodata and (m := _LIBRESSL_BANNER.search(rodata)) is not None:
            flavor, version = Flavor.LIBRESSL, m.group(1).decode()
        elif number is not None and number >> 28 == 2:
            flavor = Flavor.LIBRESSL  # LibreSSL's OPENSSL_VERSION_NUMBER is 0x20000000
        elif number is not None:
            version = decode_version_number(number)
        if flavor is Flavor.OPENSSL and version is None:
            m = _OPENSSL_BANNER.search(rodata)
            version = m.group(1).decode() if m is not None else None
        needed, runpath = self._headers.dynamic()
        return _Facts(flavor, version, self._headers.build_id(), needed, runpath, machine)

    def _rodata(self) -> bytes:
        return self._headers.data(".rodata")


def _inspect_crypto(path: Path) -> tuple[_Facts | None, dict[str, int]]:
    """Facts and probe offsets of a libcrypto; (None, {}) if unreadable or not ELF."""
    try:
        with open(path, "rb") as stream:
            scan = _ElfScan.open(stream)
            if scan is None:
                return None, {}
            syms = scan.symbols(CRYPTO_SYMBOLS + _VERSION_FUNCTIONS)
            return scan.facts(syms, scan.symbols(_BORINGSSL_SYMBOLS)), syms
    except OSError:
        return None, {}


def _find_crypto(
    path: Path, display_path: str, facts: _Facts, resolve_needed: NeededResolver | None
) -> tuple[Path, str] | None:
    """The libcrypto a dynamic libssl uses: the caller's resolver first, then the linker's way."""
    names = [n for n in facts.needed if n.startswith("libcrypto")]
    for name in names:
        if resolve_needed is not None and (found := resolve_needed(name)) is not None:
            return found
        if (found := _default_resolve(name, path, display_path, facts)) is not None:
            return found
    return None


def _default_resolve(
    name: str, path: Path, display_path: str, facts: _Facts
) -> tuple[Path, str] | None:
    root = process_root(path)
    origin = os.path.dirname(display_path)
    dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in facts.runpath]
    dirs.append(origin)
    multiarch = _MULTIARCH.get(facts.machine, "")
    dirs.extend(d.format(multiarch=multiarch) for d in _LIB_DIRS if multiarch or "{" not in d)
    for directory in dirs:
        display = os.path.normpath(os.path.join(directory, name))
        real = resolve_in_root(root, display)
        if real is not None and real.is_file():
            return real, display
    return None


def process_root(path: Path) -> Path:
    """/proc/PID/root if `path` is reached through it, else /."""
    m = _PROC_ROOT.match(str(path))
    return Path(m.group(1)) if m else Path("/")


def _display_of(path: Path) -> str:
    m = _PROC_ROOT.match(str(path))
    return (m.group(2) or "/") if m else str(path)


def resolve_in_root(root: Path, display_path: str, max_links: int = 40) -> Path | None:
    """`display_path` as seen by a process whose root is `root`, following symlinks there.

    Going through /proc/PID/root alone is not enough: an absolute symlink inside a container
    (/usr/lib/libcrypto.so.3 -> /usr/lib/libcrypto.so.3.2) would be followed in keytap's root.
    Returns a path with no symlinks below `root`, or None if a component does not exist.
    """
    parts = [p for p in display_path.split("/") if p]
    current: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if current:
                current.pop()
            continue
        candidate = root.joinpath(*current, part)
        try:
            target = os.readlink(candidate)
        except FileNotFoundError:
            return None
        except OSError:  # not a symlink (EINVAL) or unreadable: take it as it is
            current.append(part)
            continue
        links += 1
        if links > max_links:
            return None
        if target.startswith("/"):
            current = []
        parts[:0] = [p for p in target.split("/") if p]
    result = root.joinpath(*current)
    return result if os.path.lexists(result) else None
