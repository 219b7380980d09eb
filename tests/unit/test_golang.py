"""tls.golang: Go build info and pclntab, on Go binaries built here (tests.support.go_builds)
and on small synthetic tables in the older formats no toolchain here produces."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from keytap.tls.elf import ElfHeaders
from keytap.tls.golang import (
    KEYLOG_FUNCTION,
    GoBuild,
    buildinfo_version,
    inspect_go,
    parse_pclntab,
)
from keytap.tls.libraries import Flavor, inspect_library
from tests.support.go_builds import VARIANTS, go_peer, goroot


def go_nm_address(path: Path, toolchain: str) -> int:
    """What Go's own `go tool nm` says (a non-stripped build of the same source and flags)."""
    output = subprocess.run([str(goroot(toolchain) / "bin" / "go"), "tool", "nm", str(path)],
                            capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[0], 16) for line in output.splitlines()
                if line.endswith(f" {KEYLOG_FUNCTION}"))


def pyelftools_offset(path: Path, address: int) -> int:
    """The file offset of a virtual address, by pyelftools (the uprobe's offset)."""
    with path.open("rb") as stream:
        for segment in ELFFile(stream).iter_segments("PT_LOAD"):
            start = segment["p_vaddr"]
            if start <= address < start + segment["p_filesz"]:
                return segment["p_offset"] + address - start
    raise AssertionError(f"{address:#x} is in no PT_LOAD of {path}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_of_a_go_build_is_found(variant: str) -> None:
    peer = go_peer("system", variant)
    library = inspect_library(peer.path)
    assert library is not None and library.flavor is Flavor.GO
    assert library.version == peer.go_version and library.go is not None
    assert library.go.register_abi is True and library.go.reason == ""
    unstripped = go_peer("system", variant.replace("-stripped", "").replace("stripped",
                                                                            "plain"))
    assert library.go.keylog_address == go_nm_address(unstripped.path, "system")
    assert library.go.keylog_offset == pyelftools_offset(peer.path, library.go.keylog_address)
    assert library.go.role_of(library.go.keylog_address) is None  # writeKeyLog: no role
    servers = [start for start, _, server in library.go.roles if server]
    assert servers and all(library.go.role_of(s) is True for s in servers)


def test_a_go_binary_without_crypto_tls_is_no_tls_library(tmp_path: Path) -> None:
    source = tmp_path / "main.go"
    source.write_text('package main\nimport "fmt"\nfunc main() { fmt.Println("hi") }\n')
    binary = tmp_path / "hello"
    subprocess.run([str(goroot("system") / "bin" / "go"), "build", "-o", str(binary),
                    str(source)], check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GO111MODULE": "off",
                        "GOCACHE": str(Path.home() / ".cache" / "keytap-go" / "gocache")})
    with binary.open("rb") as stream:
        assert inspect_go(ElfHeaders(stream), stream.fileno()) is None


def synthetic_pclntab(magic: int, names: list[str], entries: list[int]) -> bytes:
    """A pclntab of `magic`'s format with these functions (entries: one more, the end)."""
    size = 8
    header = struct.pack("<IBBBB", magic, 0, 0, 1, size)
    names_blob = b"\0" + b"".join(n.encode() + b"\0" for n in names)
    offsets, at = [], 1
    for name in names:
        offsets.append(at)
        at += len(name) + 1
    if magic == 0xFFFFFFFB:  # 1.2: nfunc, functab (pc, funcoff)..., end pc; names anywhere
        functab_at = 8 + size
        funcs_at = functab_at + len(names) * 16 + 8
        names_at = funcs_at + len(names) * 12
        table = struct.pack("<Q", len(names))
        table += b"".join(struct.pack("<QQ", entries[i], funcs_at + 12 * i)
                          for i in range(len(names))) + struct.pack("<Q", entries[-1])
        funcs = b"".join(struct.pack("<Qi", entries[i], names_at + offsets[i])
                         for i in range(len(names)))
        return header + table + funcs + names_blob + b"\0" * 16
    wide = magic == 0xFFFFFFFA  # 1.16: entries are uintptr pairs, no textStart
    words = 7 if wide else 8
    names_at = 8 + words * size
    functab_at = names_at + len(names_blob)
    entry_size = 16 if wide else 8
    funcs_at = (len(names) + 1) * entry_size
    text = 0x401000
    fields = ([len(names), 0, names_at, functab_at, functab_at, functab_at, functab_at] if wide
              else [len(names), 0, text, names_at, functab_at, functab_at, functab_at,
                    functab_at])
    table = b""
    for i in range(len(names) + 1):
        func = funcs_at + (12 if wide else 8) * min(i, len(names) - 1)
        table += (struct.pack("<QQ", entries[i], func) if wide
                  else struct.pack("<II", entries[i] - text, func))
    funcs = b"".join(struct.pack("<Qi", entries[i], offsets[i]) if wide
                     else struct.pack("<Ii", entries[i] - text, offsets[i])
                     for i in range(len(names)))
    return header + struct.pack(f"<{words}Q", *fields) + names_blob + table + funcs


@pytest.mark.parametrize("magic", [0xFFFFFFFB, 0xFFFFFFFA, 0xFFFFFFF0, 0xFFFFFFF1])
def test_every_pclntab_format(magic: int) -> None:
    names = ["runtime.main", KEYLOG_FUNCTION, "crypto/tls.(*serverHandshakeState).doFullHandshake"]
    entries = [0x401000, 0x402000, 0x402400, 0x403000]
    found = parse_pclntab(synthetic_pclntab(magic, names, entries), 0x401000)
    assert found == [(KEYLOG_FUNCTION, 0x402000, 0x402400),
                     (names[2], 0x402400, 0x403000)]


def test_an_unknown_pclntab_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_pclntab(b"\xf2\xff\xff\xff\x00\x00\x01\x08" + b"\0" * 64, 0)


def test_buildinfo_of_go_before_1_18_is_behind_pointers() -> None:
    memory = {0x1000: struct.pack("<QQ", 0x2000, 8), 0x2000: b"go1.16.2"}
    data = b"\xff Go buildinf:" + bytes([8, 0]) + struct.pack("<QQ", 0x1000, 0)
    assert buildinfo_version(data, lambda address, size: memory[address][:size]) == "go1.16.2"
    assert GoBuild("go1.16.2", 0x1000).register_abi is False
    assert GoBuild("go1.17", 0x1000).register_abi is True
    assert GoBuild(None, 0x1000).register_abi is None
