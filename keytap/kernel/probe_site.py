"""Where a uprobe on a function traps cheaply: the first instruction the kernel emulates.

A uprobe puts int3 on an instruction; after the BPF program runs, the kernel must still carry
out the instruction it displaced. x86-64 Linux emulates a few kinds in the trap handler
(direct jumps, conditional jumps and calls, nops, and on recent kernels pushes of a
register) and single-steps any other one out of line, a second trap: on this VM a hit costs
~0.5 us on an emulated instruction and ~10 us on a single-stepped one (docs/DESIGN.md).
Prologues often begin with a single-stepped instruction (endbr64, `sub rsp`, `test rdi`, Go's
stack check) that a push, call or jump follows within a few bytes.

Moving a probe there changes nothing its program sees when every instruction before it falls
through to the next and writes none of the registers the program reads. A program that reads
the stack (Go's return address and stack arguments, a return probe's return address) needs
`rsp` kept and no memory written; one that reads only registers allows stack writes, but no
other memory writes, which could change the structs it reads. Anything else keeps the entry.

capstone decodes (see tls/accessors.py for why it rather than byte patterns); other machines
than x86-64 keep the entry (their kernels emulate other sets).
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Iterable
from pathlib import Path

from capstone import (
    CS_AC_WRITE,
    CS_ARCH_X86,
    CS_GRP_CALL,
    CS_GRP_INT,
    CS_GRP_IRET,
    CS_GRP_JUMP,
    CS_GRP_RET,
    CS_MODE_64,
    Cs,
    CsError,
    CsInsn,
)
from capstone.x86_const import X86_OP_MEM, X86_REG_RSP

WINDOW_BYTES = 48  # a prologue's first few instructions
WINDOW_INSTRUCTIONS = 8
_CONTROL = frozenset((CS_GRP_JUMP, CS_GRP_CALL, CS_GRP_RET, CS_GRP_INT, CS_GRP_IRET))

# Each general-purpose register under all its names: writing eax writes rax.
_GPR = {
    "rax": ("eax", "ax", "al", "ah"), "rbx": ("ebx", "bx", "bl", "bh"),
    "rcx": ("ecx", "cx", "cl", "ch"), "rdx": ("edx", "dx", "dl", "dh"),
    "rsi": ("esi", "si", "sil"), "rdi": ("edi", "di", "dil"),
    "rbp": ("ebp", "bp", "bpl"), "rsp": ("esp", "sp", "spl"),
    **{f"r{n}": (f"r{n}d", f"r{n}w", f"r{n}b") for n in range(8, 16)},
}
_FULL_NAME = {alias: name for name, aliases in _GPR.items() for alias in (name, *aliases)}


def cheap_site(path: Path, offset: int, reads: Iterable[str]) -> int:
    """The file offset to probe the function at `offset` of `path` with: its entry, or the
    first emulated instruction its program, reading the registers `reads` (64-bit names,
    "rsp" for anything on the stack), cannot tell from it."""
    if platform.machine() != "x86_64":
        return offset
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            code = file.read(WINDOW_BYTES)
    except OSError:
        return offset  # attaching will say what is wrong with the file
    return offset + site_in(code, frozenset(reads))


@functools.lru_cache(maxsize=256)  # copies of a build, in other containers, have the same bytes
def site_in(code: bytes, reads: frozenset[str]) -> int:
    """Where in `code` (a function's first bytes) to probe: see cheap_site."""
    disassembler = _disassembler()
    try:
        # First the quick decode (no operands) to find the candidate, then the full one of
        # only what lies before it: the full decode costs ~10 us an instruction in Python.
        site = next((address for address, size, _, _
                     in disassembler.disasm_lite(code, 0, WINDOW_INSTRUCTIONS)
                     if emulated(code[address:address + size])), 0)
        before = disassembler.disasm(code[:site], 0)
        return site if all(_transparent(disassembler, i, reads) for i in before) else 0
    except CsError:
        return 0


def emulated(encoding: bytes) -> bool:
    """Whether x86-64 Linux emulates this instruction at a uprobe (arch/x86/kernel/uprobes.c:
    branch_setup_xol_ops, push_setup_xol_ops), in the plain encodings compilers emit."""
    first = encoding[0]
    if first in (0xE8, 0xE9, 0xEB, 0x90) or 0x70 <= first <= 0x7F or 0x50 <= first <= 0x57:
        return True  # call/jmp rel, short jcc, nop, push r64
    if first == 0x41 and len(encoding) == 2:
        return 0x50 <= encoding[1] <= 0x57  # push r8..r15
    if first == 0x66:  # the operand-size prefix: only padded nops
        return encoding[1:] == b"\x90" or encoding[1:3] == b"\x0f\x1f"
    return first == 0x0F and len(encoding) > 1 and (
        0x80 <= encoding[1] <= 0x8F or encoding[1] == 0x1F)  # near jcc, multi-byte nop


def _transparent(disassembler: Cs, instruction: CsInsn, reads: frozenset[str]) -> bool:
    """Whether the program reads the same at the next instruction as at this one."""
    if not _CONTROL.isdisjoint(instruction.groups):
        return False
    _, written = instruction.regs_access()
    if any(_FULL_NAME.get(disassembler.reg_name(register)) in reads for register in written):
        return False
    return not any(
        operand.type == X86_OP_MEM and operand.access & CS_AC_WRITE
        and ("rsp" in reads or operand.mem.base != X86_REG_RSP)
        for operand in instruction.operands)


@functools.cache
def _disassembler() -> Cs:
    disassembler = Cs(CS_ARCH_X86, CS_MODE_64)
    disassembler.detail = True
    return disassembler
