"""Where uprobes go: the first emulated instruction the program cannot tell from the entry."""

import platform
from pathlib import Path

import pytest

from keytap.kernel.probe_site import cheap_site, emulated, site_in

# Prologues as compiled (objdump of the builds named): the probe moves past single-stepped
# instructions that leave what the program reads alone.
BOOKWORM_SSL_READ = bytes.fromhex(  # OpenSSL 3.0.22, Debian bookworm
    "4883ec18"  # sub rsp, 0x18
    "64488b042528000000"  # mov rax, fs:[0x28]
    "4889442408"  # mov [rsp+8], rax
    "31c0"  # xor eax, eax
    "85d2"  # test edx, edx
    "782f")  # js: emulated, at 22
SID_SSL_FREE = bytes.fromhex("f30f1efa" "4885ff" "746f" "53")  # endbr64; test rdi; je (7)
SID_SSL_DO_HANDSHAKE = bytes.fromhex(  # OpenSSL 3.6.5: endbr64; sub rsp, 0x48; ...; je (27)
    "f30f1efa" "4883ec48" "64488b042528000000" "4889442428" "31c0" "4885ff" "0f8499000000")
GO_WRITE_KEY_LOG = bytes.fromhex(  # Go 1.24: lea r12, [rsp-0x20]; cmp r12, [r14+0x10]; jbe
    "4c8d6424e0" "4d3b6610" "0f86f3010000" "55")
GO_ARGUMENTS = frozenset({"rbx", "rcx", "rdi", "rsi", "r9", "r10", "rsp"})


@pytest.mark.parametrize(("code", "reads", "site"), [
    (BOOKWORM_SSL_READ, {"rdi"}, 22),
    (SID_SSL_FREE, {"rdi"}, 7),
    (SID_SSL_DO_HANDSHAKE, {"rdi"}, 27),
    (SID_SSL_DO_HANDSHAKE, {"rdi", "rsp"}, 0),  # a return probe: sub rsp moves the stack
    (BOOKWORM_SSL_READ, {"rdi", "rsp"}, 0),
    (GO_WRITE_KEY_LOG, GO_ARGUMENTS, 9),  # r12 is no argument, cmp writes only flags
    (GO_WRITE_KEY_LOG, GO_ARGUMENTS | {"r12"}, 0),
    (bytes.fromhex("53" "4883ec10"), {"rdi", "rsp"}, 0),  # push rbx: emulated at the entry
])
def test_site(code: bytes, reads: set[str], site: int) -> None:
    assert site_in(code, frozenset(reads)) == site


@pytest.mark.parametrize("code", [
    bytes.fromhex("4889c7" "53"),  # mov rdi, rax: the argument is overwritten
    bytes.fromhex("89c7" "53"),  # mov edi, eax: a 32-bit write clears rdi's top half too
    bytes.fromhex("c74710" "00000000" "53"),  # mov dword [rdi+0x10], 0: the struct changes
    bytes.fromhex("c3" "53"),  # ret: what follows is another function
    bytes.fromhex("ffe0" "53"),  # jmp rax: an indirect jump is single-stepped, and leaves
    bytes.fromhex("4889c1" * 9 + "53"),  # mov rcx, rax: beyond the window
    b"",
])
def test_entry_kept(code: bytes) -> None:
    assert site_in(code, frozenset({"rdi"})) == 0


def test_stack_writes_allowed_unless_the_stack_is_read() -> None:
    code = bytes.fromhex("4889442408" "53")  # mov [rsp+8], rax; push rbx
    assert site_in(code, frozenset({"rdi"})) == 5
    assert site_in(code, frozenset({"rdi", "rsp"})) == 0


@pytest.mark.parametrize(("encoding", "cheap"), [
    ("e800000000", True), ("e900000000", True), ("eb00", True), ("7400", True),
    ("0f8400000000", True), ("90", True), ("6690", True), ("0f1f4000", True),
    ("660f1f440000", True), ("53", True), ("4154", True),
    ("f30f1efa", False),  # endbr64: single-stepped (measured)
    ("4883ec18", False), ("4885ff", False), ("c3", False), ("ffd0", False),
    ("660f8400000000", False),  # a jcc with an operand-size prefix is not emulated
])
def test_emulated(encoding: str, cheap: bool) -> None:
    assert emulated(bytes.fromhex(encoding)) is cheap


def test_cheap_site_reads_the_file(tmp_path: Path) -> None:
    binary = tmp_path / "lib.so"
    binary.write_bytes(b"\xcc" * 100 + SID_SSL_FREE)
    moved = 107 if platform.machine() == "x86_64" else 100  # other machines keep the entry
    assert cheap_site(binary, 100, ("rdi",)) == moved
    assert cheap_site(tmp_path / "gone.so", 100, ("rdi",)) == 100
