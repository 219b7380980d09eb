"""A pcap-filter expression ('tcp port 443 or icmp') run inside the classifier.

libpcap compiles the expression (pcap_compile(), the compiler tcpdump uses, so the language
and its corner cases are tcpdump's own) into classic BPF for an Ethernet link. A TC program is
eBPF, and BCC compiles C, so the classic program is written out here as one C function that
bpf/capture.c calls before copying a packet: one label per instruction and forward gotos
(classic BPF jumps only forward, so the verifier sees a graph without loops). Packets it
rejects never reach user space and are counted as filtered.

libpcap is reached through ctypes: the four calls needed here are its stable C API, and the
Python bindings on PyPI (pcapy-ng, python-libpcap) build against libpcap's headers at install.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

from keytap.errors import BadInput

DLT_EN10MB = 1  # what TC sees on veth and other Ethernet devices: the frame from its MAC header
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
SKF_AD_OFF = 0xFFFFF000  # Linux socket-filter extensions: not classic BPF, not emitted here

# classic BPF (linux/filter.h, pcap/bpf.h)
LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
K, X = 0x00, 0x08
RET_A = 0x10
TXA = 0x80
SIZES = {W: 4, H: 2, B: 1}
ALU_OPS = {0x00: "+", 0x10: "-", 0x20: "*", 0x30: "/", 0x40: "|", 0x50: "&", 0x60: "<<",
           0x70: ">>", 0x90: "%", 0xA0: "^"}
NEG = 0x80
JUMPS = {0x10: "==", 0x20: ">", 0x30: ">="}
JA, JSET = 0x00, 0x40
MEMWORDS = 16


@dataclass(frozen=True, slots=True)
class Instruction:
    code: int
    jt: int
    jf: int
    k: int


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


def _libpcap() -> ctypes.CDLL:
    name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise BadInput("a filter expression needs libpcap: apt-get install libpcap0.8") from None
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_uint32]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    return lib


def compile_expression(expression: str, snaplen: int) -> list[Instruction]:
    """libpcap's classic BPF for `expression` on Ethernet; BadInput with libpcap's message."""
    lib = _libpcap()
    handle = lib.pcap_open_dead(DLT_EN10MB, snaplen)
    if not handle:
        raise BadInput("libpcap could not open a handle to compile the filter")
    program = _BpfProgram()
    try:
        if lib.pcap_compile(handle, ctypes.byref(program), expression.encode(), 1,
                            PCAP_NETMASK_UNKNOWN) != 0:
            error = lib.pcap_geterr(handle).decode(errors="replace")
            error = error.removeprefix("can't parse filter expression: ")
            raise BadInput(f"filter expression {expression!r}: {error} "
                           "(the language: man 7 pcap-filter)")
        try:
            return [Instruction(i.code, i.jt, i.jf, i.k)
                    for i in program.bf_insns[:program.bf_len]]
        finally:
            lib.pcap_freecode(ctypes.byref(program))
    finally:
        lib.pcap_close(handle)


def to_c(program: list[Instruction], function: str = "packet_filter") -> str:
    """The classic program as `static __always_inline u32 <function>(struct __sk_buff *skb)`:
    0 rejects, anything else accepts (classic BPF's return value is a snap length)."""
    body = [_statement(index, insn, len(program)) for index, insn in enumerate(program)]
    uses_memory = any(insn.code & 0x07 in (ST, STX)
                      or (insn.code & 0xE0 == MEM and insn.code & 0x07 in (LD, LDX))
                      for insn in program)
    lines = [f"static __always_inline u32 {function}(struct __sk_buff *skb)", "{",
             "    u32 A = 0, X = 0;", "    u8 bytes[4];"]
    if uses_memory:
        lines.append(f"    u32 M[{MEMWORDS}] = {{}};")
    lines += [f"L{index}: {statement}" for index, statement in enumerate(body)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _statement(index: int, insn: Instruction, length: int) -> str:
    """One instruction as C; raises BadInput for what classic BPF on a socket would refuse."""
    cls, code, k = insn.code & 0x07, insn.code, insn.k

    def target(offset: int) -> str:
        to = index + 1 + offset
        if to >= length:
            raise BadInput("the compiled filter jumps past its end")
        return f"L{to}"

    def memory(word: int) -> str:
        if word >= MEMWORDS:
            raise BadInput("the compiled filter uses scratch memory out of range")
        return f"M[{word}]"

    if cls in (LD, LDX):
        register, mode = ("A", code & 0xE0) if cls == LD else ("X", code & 0xE0)
        if mode == IMM:
            return f"{register} = {k:#x}u;"
        if mode == LEN:
            return f"{register} = skb->len;"
        if mode == MEM:
            return f"{register} = {memory(k)};"
        if cls == LDX and mode == MSH:
            return f"{_load(str(k), 1)} X = (bytes[0] & 0xf) << 2;"
        if cls == LD and mode in (ABS, IND):
            if k >= SKF_AD_OFF:
                raise BadInput("the filter needs Linux socket-filter extensions (vlan/ifindex "
                               "ancillary data), which keytap's classifier does not have")
            size = SIZES[code & 0x18]
            offset = f"{k:#x}u" if mode == ABS else f"X + {k:#x}u"
            return f"{_load(offset, size)} A = {_big_endian(size)};"
    elif cls == ST:
        return f"{memory(k)} = A;"
    elif cls == STX:
        return f"{memory(k)} = X;"
    elif cls == ALU:
        op = code & 0xF0
        if op == NEG:
            return "A = -A;"
        operand = "X" if code & X else f"{k:#x}u"
        symbol = ALU_OPS.get(op)
        if symbol is None:
            raise BadInput(f"unknown classic BPF ALU operation {code:#x}")
        if symbol in ("/", "%"):
            guard = "if (X == 0) return 0; " if code & X else ""
            if not code & X and k == 0:
                return "return 0;"
            return f"{guard}A {symbol}= {operand};"
        if symbol in ("<<", ">>"):
            return f"A {symbol}= ({operand}) & 31;"
        return f"A {symbol}= {operand};"
    elif cls == JMP:
        op = code & 0xF0
        if op == JA:
            return f"goto {target(k)};"
        operand = "X" if code & X else f"{k:#x}u"
        condition = (f"(A & {operand})" if op == JSET else
                     f"A {JUMPS[op]} {operand}" if op in JUMPS else None)
        if condition is None:
            raise BadInput(f"unknown classic BPF jump {code:#x}")
        return f"if ({condition}) goto {target(insn.jt)}; goto {target(insn.jf)};"
    elif cls == RET:
        source = code & 0x18
        return {RET_A: "return A;", X: "return X;"}.get(source, f"return {k:#x}u;")
    elif cls == MISC:
        return "A = X;" if code & 0xF8 == TXA else "X = A;"
    raise BadInput(f"unknown classic BPF instruction {code:#x}")


def _load(offset: str, size: int) -> str:
    """A bounds-checked load: out of the packet, classic BPF rejects it, as here."""
    return f"if (bpf_skb_load_bytes(skb, {offset}, bytes, {size}) < 0) return 0;"


def _big_endian(size: int) -> str:
    return {1: "bytes[0]", 2: "((u32)bytes[0] << 8) | bytes[1]",
            4: "((u32)bytes[0] << 24) | ((u32)bytes[1] << 16) | ((u32)bytes[2] << 8) | bytes[3]"
            }[size]
