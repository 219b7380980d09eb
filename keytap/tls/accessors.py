"""Struct offsets read from an OpenSSL build's own machine code (x86-64 only).

For a build with no exact table entry (a distro's newer libssl, a vendored copy), the
exported accessors still say where the members are: ``SSL_version`` is ``return
s->version;`` and so on.  The derived offsets filter the table's layouts and adjust the
nearest one (tls.candidates); like any candidate, the result is used only once the wire
proves it.

Why capstone: register choice, instruction order, inlined ``memcpy`` shapes and Debian's
``-fzero-call-used-regs`` tails differ per build, so byte patterns break.  Decoded
instructions run through a small path-by-path symbolic interpreter ("arg + disp", "load of
(value + disp)"; branches fork and prune on compares with constants; direct ``jmp`` is
followed, a direct ``call`` only from a thin wrapper, other calls are opaque but their
address arguments are recorded).  A field is reported only when its pattern is unambiguous,
otherwise left out, never guessed.

Derived (Layout names): ssl_version, server, session, session_cipher, cipher_id,
session_master_key(_length), s3_is_pointer and s3 / s3_client_random / s3_server_random
(with an embedded s3 the copy shows only ``s3 + member``, reported as the extra keys
client_random / server_random; SSL_stateless's ``s3.flags`` update splits it), ssl_type
(3.2+ ``SSL_CONNECTION_FROM_SSL``), early_exporter_master_secret
(SSL_export_keying_material_early).  Static builds naming internal functions in .symtab
also give exporter_master_secret, handshake_secret and handshake_traffic_hash (3.5+).

Not derived: client/server_app_traffic_secret (only the large tls13_change_cipher_state
touches them), the other TLS 1.3 arrays of a shared libssl (a matching layout places them),
session_cipher_id, sizes.  Other machines than x86-64 give {} (aarch64 needs its own front
end).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsError, CsInsn
from capstone.x86_const import X86_OP_IMM, X86_OP_MEM, X86_OP_REG, X86_REG_RIP

from keytap.tls.offsets import Layout

# Exported functions taking an SSL * (from 3.2 they begin with SSL_CONNECTION_FROM_SSL).
SSL_ACCESSORS = (
    "SSL_version",
    "SSL_is_server",
    "SSL_get_client_random",
    "SSL_get_server_random",
    "SSL_get_session",
    "SSL_get0_session",  # a macro for SSL_get_session upstream; some builds export it
    "SSL_stateless",
    "SSL_export_keying_material_early",
)
OTHER_ACCESSORS = ("SSL_SESSION_get_master_key", "SSL_SESSION_get0_cipher", "SSL_CIPHER_get_id")
# Internal functions (SSL_CONNECTION *, no type check), named only in a static build's
# .symtab: each passes the address of one TLS 1.3 array to a call.
# name -> (field, argument register of the call that receives the array)
INTERNAL_ANCHORS = {
    "tls13_export_keying_material": ("exporter_master_secret", "rdx"),  # tls13_hkdf_expand
    "tls13_store_handshake_traffic_hash": ("handshake_traffic_hash", "rsi"),  # tls13_store_hash
    # tls13_generate_secret(s, md, s->early_secret, in, inlen, s->handshake_secret)
    "tls13_generate_handshake_secret": ("handshake_secret", "r9"),
}
ACCESSORS = SSL_ACCESSORS + OTHER_ACCESSORS + tuple(INTERNAL_ANCHORS)

# Keys that are not Layout fields: offsets from the SSL * of the randoms in an embedded s3.
EXTRA_FIELDS = ("client_random", "server_random")

_TLS1_FLAGS_STATELESS = 0x800
_RANDOM_SIZE = 32
_MASTER_KEY_MAX = 48

# Exploration limits (per accessor); beyond them the accessor yields nothing.
_MAX_STEPS = 6000
_MAX_INLINE_STEPS = 200
_MAX_INLINE_DEPTH = 2
_MAX_VISITS = 2  # per instruction and path: loops (inlined memcpy tails) are cut there
_MAX_PATHS = 512


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arg:
    """An incoming register: 0..5 = rdi, rsi, rdx, rcx, r8, r9; -1 = rsp at entry."""

    index: int


@dataclass(frozen=True, slots=True)
class Load:
    """The `size` bytes read from memory at `addr`."""

    addr: Val
    size: int


@dataclass(frozen=True, slots=True)
class Opaque:
    """A value nothing is known about except its identity (e.g. a call's result)."""

    ident: int


@dataclass(frozen=True, slots=True)
class Val:
    """base + disp; base None means the constant disp."""

    base: Arg | Load | Opaque | None
    disp: int = 0

    def plus(self, n: int) -> Val:
        if self.base is None:
            return Val(None, (self.disp + n) & 0xFFFFFFFFFFFFFFFF)
        return Val(self.base, self.disp + n)


SSL = Val(Arg(0))  # the first argument: SSL *, SSL_SESSION * or SSL_CIPHER *
_SP0 = Arg(-1)


@dataclass(frozen=True, slots=True)
class Access:
    """A memory operand met on a path: kind is load, store, rmw, lea or arg.

    For arg (an address handed to an opaque call) `mnemonic` is the argument register and
    `imm` the call's target; otherwise `imm` is the instruction's immediate, if any.
    """

    kind: str
    addr: Val
    size: int
    mnemonic: str = ""
    imm: int | None = None


@dataclass(frozen=True, slots=True)
class Fact:
    """What a taken branch says about a value: op is eq, ne, le or ge (unsigned) k."""

    value: Val
    op: str
    k: int


@dataclass(frozen=True)
class PathResult:
    """One explored path: what it returned (None: unknown, or the path did not return)."""

    returned: Val | None
    complete: bool  # reached `ret` of the accessor
    facts: tuple[Fact, ...]
    accesses: tuple[Access, ...]


class GiveUp(Exception):
    """Exploration went over budget or met something it cannot follow."""


# --- code access ------------------------------------------------------------------------------


class CodeImage:
    """Executable bytes by virtual address, plus the ranges that are PLT stubs (external)."""

    def __init__(
        self,
        segments: Iterable[tuple[int, bytes | memoryview]],
        external: Iterable[tuple[int, int]] = (),
    ) -> None:
        self.segments = sorted(segments, key=lambda seg: seg[0])
        self.external = list(external)  # (start, end) vaddr ranges

    def read(self, vaddr: int, size: int) -> bytes:
        for start, data in self.segments:
            if start <= vaddr < start + len(data):
                return bytes(data[vaddr - start : vaddr - start + size])
        return b""

    def is_external(self, vaddr: int) -> bool:
        return any(start <= vaddr < end for start, end in self.external)

    def contains(self, vaddr: int) -> bool:
        return bool(self.read(vaddr, 1))


# --- the interpreter --------------------------------------------------------------------------

_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
_CLOBBERED = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")


def _gpr_table() -> dict[str, tuple[str, int]]:
    table: dict[str, tuple[str, int]] = {}
    for x in "abcd":
        table.update({f"r{x}x": (f"r{x}x", 8), f"e{x}x": (f"r{x}x", 4), f"{x}x": (f"r{x}x", 2)})
        table.update({f"{x}l": (f"r{x}x", 1), f"{x}h": (f"r{x}x", 0)})  # 0: high byte
    for r in ("si", "di", "bp", "sp"):
        table.update({f"r{r}": (f"r{r}", 8), f"e{r}": (f"r{r}", 4), r: (f"r{r}", 2)})
        table[f"{r}l"] = (f"r{r}", 1)
    for n in range(8, 16):
        table.update({f"r{n}": (f"r{n}", 8), f"r{n}d": (f"r{n}", 4), f"r{n}w": (f"r{n}", 2)})
        table[f"r{n}b"] = (f"r{n}", 1)
    return table


_GPR = _gpr_table()
_JCC = {
    "je", "jne", "jb", "jbe", "ja", "jae", "jl", "jle", "jg", "jge", "js", "jns", "jo", "jno",
    "jp", "jnp",
}
_STOP = {"ud2", "hlt", "int3", "ud1", "ud0"}
_NOP = {"nop", "endbr64", "endbr32", "pause"}


@dataclass
class _State:
    pc: int
    regs: dict[str, Val | None]
    stack: dict[int, Val | None]
    flags: tuple | None = None
    facts: list[Fact] = field(default_factory=list)
    accesses: list[Access] = field(default_factory=list)
    visits: dict[int, int] = field(default_factory=dict)
    other_type: bool = False  # took the "not an SSL_CONNECTION" (QUIC) side of the check
    home: tuple[int, int] | None = None  # the accessor's own [start, end), while inside it

    def fork(self, pc: int) -> _State:
        return _State(
            pc,
            dict(self.regs),
            dict(self.stack),
            self.flags,
            list(self.facts),
            list(self.accesses),
            dict(self.visits),
            self.other_type,
            self.home,
        )

    def assume(self, value: Val, op: str, k: int) -> bool:
        """Record a branch fact; False when it contradicts what the path already knows."""
        if value.base is None:
            return _holds(value.disp, op, k)
        lo, hi, ne = 0, (1 << 64) - 1, set()
        for f in [*self.facts, Fact(value, op, k)]:
            if f.value != value:
                continue
            if f.op == "eq":
                lo, hi = max(lo, f.k), min(hi, f.k)
            elif f.op == "le":
                hi = min(hi, f.k)
            elif f.op == "ge":
                lo = max(lo, f.k)
            else:
                ne.add(f.k)
        while lo <= hi and lo in ne:
            lo += 1
        while hi >= lo and hi in ne:
            hi -= 1
        if lo > hi:
            return False
        self.facts.append(Fact(value, op, k))
        return True


def _holds(x: int, op: str, k: int) -> bool:
    return {"eq": x == k, "ne": x != k, "le": x <= k, "ge": x >= k}[op]


# Facts a conditional jump establishes after `cmp x, k` (or `test x, x`, k = 0):
# mnemonic -> ((op, k adjustment) when taken, (op, k adjustment) when not taken).
_JCC_FACTS = {
    "je": (("eq", 0), ("ne", 0)),
    "jne": (("ne", 0), ("eq", 0)),
    "jb": (("le", -1), ("ge", 0)),
    "jae": (("ge", 0), ("le", -1)),
    "jbe": (("le", 0), ("ge", 1)),
    "ja": (("ge", 1), ("le", 0)),
}


class _Explorer:
    """Path-by-path symbolic execution of one accessor."""

    def __init__(self, code: CodeImage) -> None:
        self.code = code
        self.md = Cs(CS_ARCH_X86, CS_MODE_64)
        self.md.detail = True
        self.steps = 0
        self.opaque = 0
        self._insns: dict[int, CsInsn | None] = {}
        self._opaque_targets: set[int] = set()

    def insn(self, pc: int) -> CsInsn | None:
        if pc not in self._insns:
            data = self.code.read(pc, 16)
            self._insns[pc] = next(self.md.disasm(data, pc, 1), None) if data else None
        return self._insns[pc]

    # Entry point: every path of the function at `entry`, called with the standard arguments.
    def explore(self, entry: int, size: int = 0) -> list[PathResult]:
        regs: dict[str, Val | None] = {r: Val(Arg(i)) for i, r in enumerate(_ARG_REGS)}
        regs["rsp"] = Val(_SP0)
        start = _State(entry, regs, {}, home=(entry, entry + size) if size else None)
        done, partial = self._run(start, depth=0, budget=_MAX_STEPS)
        results = [
            PathResult(s.regs.get("rax"), True, tuple(s.facts), tuple(s.accesses)) for s in done
        ]
        results += [PathResult(None, False, tuple(s.facts), tuple(s.accesses)) for s in partial]
        return results

    def _run(self, start: _State, depth: int, budget: int) -> tuple[list[_State], list[_State]]:
        """Explore from `start` until `ret` of this frame: (returned states, cut-off states).

        Inside an inlined call (depth > 0) anything unusual raises GiveUp so that the caller
        can treat the call as opaque instead.
        """
        work = [start]
        done: list[_State] = []
        partial: list[_State] = []
        used = 0
        paths = 1
        while work:
            s = work.pop()
            while True:
                used += 1
                self.steps += 1
                if used > budget or self.steps > _MAX_STEPS:
                    raise GiveUp("step budget")
                count = s.visits.get(s.pc, 0) + 1
                s.visits[s.pc] = count
                if s.other_type and not depth:
                    partial.append(s)  # QUIC objects: nothing to learn there (see _type_check)
                    break
                if count > _MAX_VISITS:
                    if depth:
                        raise GiveUp("loop in inlined call")
                    partial.append(s)
                    break
                insn = self.insn(s.pc)
                if insn is None:
                    raise GiveUp(f"cannot decode at {s.pc:#x}")
                outcome = self._step(s, insn, depth)
                if outcome == "next":
                    continue
                if outcome == "ret":
                    done.append(s)
                    break
                if outcome == "stop":  # ud2 & co: the path does not return
                    break
                if outcome == "cut":
                    if depth:
                        raise GiveUp("indirect jump in inlined call")
                    partial.append(s)
                    break
                assert isinstance(outcome, _State)  # a fork: the taken branch
                paths += 1
                if paths > _MAX_PATHS:
                    raise GiveUp("too many paths")
                work.append(outcome)
                if s.pc < 0:  # fall-through infeasible
                    break
        return done, partial

    # One instruction; returns "next", "ret", "stop", "cut" or a forked state (s continues).
    def _step(self, s: _State, insn: CsInsn, depth: int) -> str | _State:
        m = insn.mnemonic.split()[-1]  # "repz ret", "bnd jmp", "notrack jmp"
        nxt = insn.address + insn.size
        ops = insn.operands
        self._record_memory(s, insn)
        s.pc = nxt
        if m in _NOP:
            return "next"
        if m in _STOP:
            return "stop"
        if m == "ret":
            sp = s.regs.get("rsp")
            if sp is None:
                raise GiveUp("ret with unknown stack")
            s.regs["rsp"] = sp.plus(8)
            return "ret"
        if m == "jmp":
            target = self._direct_target(insn)
            if target is None:
                if ops and ops[0].type == X86_OP_MEM and ops[0].mem.base == X86_REG_RIP:
                    self._external_call(s, None)  # jmp through the GOT: a tail call
                    return "ret"
                return "cut"  # jump table or computed jump
            if self.code.is_external(target) or not self.code.contains(target):
                self._external_call(s, target)
                return "ret"
            if s.home is not None and not s.home[0] <= target < s.home[1]:
                # A tail call: what it is handed counts like a call's arguments; then follow.
                self._record_args(s, target)
                s.home = None
            s.pc = target
            return "next"
        if m in _JCC:
            target = self._direct_target(insn)
            if target is None:
                return "cut"
            taken = s.fork(target)
            facts = self._branch_facts(s.flags, m)
            if facts is not None:
                (value, op_taken, k_taken), (_, op_not, k_not) = facts
                if not taken.assume(value, op_taken, k_taken):
                    return "next"  # only the fall-through is feasible
                if not s.assume(value, op_not, k_not):
                    s.pc = -1  # only the taken branch is feasible
                for state in (taken, s):
                    state.other_type = state.other_type or _leaves_connection(state)
            return taken
        if m == "call":
            return self._call(s, insn, depth, nxt)
        if m in ("mov", "movabs", "movzx", "movsx", "movsxd"):
            if ops[0].type == X86_OP_REG:
                self._set_reg(s, insn.reg_name(ops[0].reg), self._read(s, insn, ops[1]))
            elif ops[0].type == X86_OP_MEM:
                addr = self._addr(s, insn, ops[0])
                if addr is not None and addr.base == _SP0 and ops[0].size == 8:
                    s.stack[addr.disp] = self._read(s, insn, ops[1])
            return "next"
        if m == "lea":
            self._set_reg(s, insn.reg_name(ops[0].reg), self._addr(s, insn, ops[1]))
            return "next"
        if m == "push":
            sp = s.regs.get("rsp")
            if sp is None:
                raise GiveUp("push with unknown stack")
            value = self._read(s, insn, ops[0])
            sp = sp.plus(-8)
            s.regs["rsp"] = sp
            _forget_stack(s, sp.disp, 8)
            s.stack[sp.disp] = value
            return "next"
        if m == "pop":
            sp = s.regs.get("rsp")
            if sp is None:
                raise GiveUp("pop with unknown stack")
            if ops[0].type == X86_OP_REG:
                self._set_reg(s, insn.reg_name(ops[0].reg), s.stack.get(sp.disp))
            s.regs["rsp"] = sp.plus(8)
            return "next"
        if m in ("add", "sub") and ops[0].type == X86_OP_REG and ops[1].type == X86_OP_IMM:
            name = insn.reg_name(ops[0].reg)
            value = self._read(s, insn, ops[0])
            imm = ops[1].imm if m == "add" else -ops[1].imm
            width = _GPR.get(name, ("", 0))[1]
            if value is not None and (width == 8 or (width == 4 and value.base is None)):
                result: Val | None = value.plus(imm)
                if width == 4 and result is not None:
                    result = Val(None, result.disp & 0xFFFFFFFF)
            else:
                result = None
            self._set_reg(s, name, result)
            s.flags = None
            return "next"
        if m == "xor" and len(ops) == 2 and ops[0].type == ops[1].type == X86_OP_REG and (
            ops[0].reg == ops[1].reg
        ):
            self._set_reg(s, insn.reg_name(ops[0].reg), Val(None, 0))
            s.flags = ("cmp", Val(None, 0), Val(None, 0))
            return "next"
        if m == "test" and len(ops) == 2:
            a = self._read(s, insn, ops[0])
            same = ops[1].type == X86_OP_REG and ops[0].type == X86_OP_REG
            if same and ops[0].reg == ops[1].reg and a is not None:
                s.flags = ("cmp", a, Val(None, 0))
            else:
                s.flags = None
            return "next"
        if m == "cmp" and len(ops) == 2:
            a = self._read(s, insn, ops[0])
            b = self._read(s, insn, ops[1])
            if b is not None and b.base is None:
                b = Val(None, b.disp & _mask(ops[0].size))
            s.flags = ("cmp", a, b) if a is not None else None
            return "next"
        if m.startswith("cmov") and ops[0].type == X86_OP_REG:
            old = self._read(s, insn, ops[0])
            new = self._read(s, insn, ops[1])
            self._set_reg(s, insn.reg_name(ops[0].reg), self._cmov(s, m, old, new))
            return "next"
        if m == "leave":
            rbp = s.regs.get("rbp")
            if rbp is None or rbp.base != _SP0:
                raise GiveUp("leave with unknown frame")
            s.regs["rbp"] = s.stack.get(rbp.disp)
            s.regs["rsp"] = rbp.plus(8)
            return "next"
        # Anything else: whatever it writes becomes unknown.
        try:
            _, written = insn.regs_access()
        except CsError as exc:
            raise GiveUp(f"cannot tell what {m} writes") from exc
        for reg in written:
            name = insn.reg_name(reg)
            if name in ("rflags", "eflags"):
                s.flags = None
            elif name in _GPR:
                if _GPR[name][0] == "rsp":
                    raise GiveUp(f"stack pointer changed by {m}")
                self._set_reg(s, name, None)
        return "next"

    def _cmov(self, s: _State, m: str, old: Val | None, new: Val | None) -> Val | None:
        """old or new; `min(x, const)` (cmp x, c; cmovbe c_reg, x) keeps its bound."""
        if old == new:
            return old
        flags = s.flags
        if flags is None or flags[0] != "cmp" or old is None or new is None:
            return None
        _, a, b = flags
        if m in ("cmovbe", "cmovb") and (new, old) == (a, b):
            bound = old  # picks x when x <= c, else keeps c
        elif m in ("cmova", "cmovae") and (new, old) == (b, a):
            bound = new
        else:
            return None
        if bound.base is not None:
            return None
        self.opaque += 1
        result = Val(Opaque(self.opaque))
        s.facts.append(Fact(result, "le", bound.disp))
        return result

    def _call(self, s: _State, insn: CsInsn, depth: int, nxt: int) -> str:
        target = self._direct_target(insn)
        if (
            target is None
            or target in self._opaque_targets
            or self.code.is_external(target)
            or not self.code.contains(target)
            or depth >= _MAX_INLINE_DEPTH
            or not self._returns_after(nxt)
        ):
            self._external_call(s, target)
            return "next"
        # Inline the callee; if it does not come back cleanly, it is an opaque call.
        callee = s.fork(target)
        sp = callee.regs.get("rsp")
        if sp is None:
            raise GiveUp("call with unknown stack")
        callee.regs["rsp"] = sp.plus(-8)
        callee.stack[sp.disp - 8] = Val(None, nxt)
        callee.visits = {}
        steps = self.steps
        try:
            done, _ = self._run(callee, depth + 1, _MAX_INLINE_STEPS)
        except GiveUp:
            self.steps = steps + 1
            self._opaque_targets.add(target)  # too big to inline: the same next time
            self._external_call(s, target)
            return "next"
        if len(done) != 1:
            # Several outcomes: keep the caller a single path, with what all of them agree on.
            self._external_call(s, target)
            return "next"
        back = done[0]
        s.regs, s.stack, s.flags = back.regs, back.stack, None
        s.facts, s.accesses = back.facts, back.accesses
        return "next"

    def _returns_after(self, pc: int) -> bool:
        """True when only epilogue (stack adjustment, pops, register zeroing) lies between
        a call returning to `pc` and `ret`: the caller is a thin wrapper, worth following."""
        for _ in range(12):
            insn = self.insn(pc)
            if insn is None:
                return False
            m = insn.mnemonic.split()[-1]
            ops = insn.operands
            if m == "ret":
                return True
            epilogue = (
                m in _NOP
                or (m == "pop" and _GPR.get(insn.reg_name(ops[0].reg), ("",))[0] != "rax")
                or (m == "add" and ops[0].type == X86_OP_REG and insn.reg_name(ops[0].reg) == "rsp")
                or (  # Debian's -fzero-call-used-regs
                    m == "xor"
                    and ops[0].type == ops[1].type == X86_OP_REG
                    and ops[0].reg == ops[1].reg
                    and _GPR.get(insn.reg_name(ops[0].reg), ("",))[0] != "rax"
                )
            )
            if not epilogue:
                return False
            pc = insn.address + insn.size
        return False

    def _record_args(self, s: _State, target: int | None) -> None:
        for reg in _ARG_REGS:
            value = s.regs.get(reg)
            if value is not None and value.base is not None and value.base != _SP0:
                s.accesses.append(Access("arg", value, 0, reg, target))

    def _external_call(self, s: _State, target: int | None) -> None:
        self._record_args(s, target)
        for reg in _CLOBBERED:
            s.regs[reg] = None
        self.opaque += 1
        s.regs["rax"] = Val(Opaque(self.opaque))
        s.flags = None

    @staticmethod
    def _direct_target(insn: CsInsn) -> int | None:
        ops = insn.operands
        if len(ops) == 1 and ops[0].type == X86_OP_IMM:
            return ops[0].imm & 0xFFFFFFFFFFFFFFFF
        return None

    @staticmethod
    def _branch_facts(
        flags: tuple | None, mnemonic: str
    ) -> tuple[tuple[Val, str, int], tuple[Val, str, int]] | None:
        """(value, op, k) when the branch is taken and when not, after `cmp x, const`."""
        if flags is None or flags[0] != "cmp" or mnemonic not in _JCC_FACTS:
            return None
        _, value, other = flags
        if other is None or other.base is not None or value is None:
            return None
        k = other.disp
        (op_t, dt), (op_n, dn) = _JCC_FACTS[mnemonic]
        if not (0 <= k + dt < 1 << 64 and 0 <= k + dn < 1 << 64):
            return None
        return (value, op_t, k + dt), (value, op_n, k + dn)

    def _record_memory(self, s: _State, insn: CsInsn) -> None:
        imm = next((op.imm for op in insn.operands if op.type == X86_OP_IMM), None)
        for op in insn.operands:
            if op.type != X86_OP_MEM:
                continue
            addr = self._addr(s, insn, op)
            if addr is not None and addr.base == _SP0 and op.access & 2:
                _forget_stack(s, addr.disp, op.size)  # a `mov` sets the slot again after this
            if addr is None or addr.base is None or addr.base == _SP0:
                continue
            if insn.mnemonic == "lea":
                kind = "lea"
            elif insn.mnemonic in ("nop",) or insn.mnemonic.startswith("prefetch"):
                continue
            else:
                kind = {1: "load", 2: "store", 3: "rmw"}.get(op.access, "load")
            value = None if imm is None else imm & _mask(op.size)
            s.accesses.append(Access(kind, addr, op.size, insn.mnemonic, value))

    def _addr(self, s: _State, insn: CsInsn, op) -> Val | None:
        mem = op.mem
        if mem.segment:
            return None
        if mem.base == X86_REG_RIP:
            return Val(None, (insn.address + insn.size + mem.disp) & 0xFFFFFFFFFFFFFFFF)
        if mem.index:
            return None  # indexed: a copy loop or a table, never a plain member
        if not mem.base:
            return Val(None, mem.disp & 0xFFFFFFFFFFFFFFFF)
        base = self._reg(s, insn.reg_name(mem.base))
        if base is None:
            return None
        return base.plus(mem.disp)

    def _read(self, s: _State, insn: CsInsn, op) -> Val | None:
        if op.type == X86_OP_IMM:
            return Val(None, op.imm & _mask(op.size))
        if op.type == X86_OP_REG:
            return self._reg(s, insn.reg_name(op.reg))
        if op.type == X86_OP_MEM:
            addr = self._addr(s, insn, op)
            if addr is None:
                return None
            if addr.base == _SP0:
                return s.stack.get(addr.disp) if op.size == 8 else None
            return Val(Load(addr, op.size))
        return None

    @staticmethod
    def _reg(s: _State, name: str) -> Val | None:
        if name not in _GPR:
            return None
        full, width = _GPR[name]
        value = s.regs.get(full)
        if value is None or width == 8:
            return value
        if width == 0:
            return None
        if value.base is None:
            return Val(None, value.disp & _mask(width))
        if isinstance(value.base, Load) and value.disp == 0 and value.base.size <= width:
            return value
        if isinstance(value.base, Opaque) and value.disp == 0:
            return value  # e.g. `test eax, eax` on an int returned by a call
        return None

    @staticmethod
    def _set_reg(s: _State, name: str, value: Val | None) -> None:
        if name not in _GPR:
            return
        full, width = _GPR[name]
        if width == 8:
            s.regs[full] = value
        elif width == 4:  # 32-bit writes zero-extend
            if value is not None and value.base is None:
                value = Val(None, value.disp & 0xFFFFFFFF)
            elif value is not None and not (
                isinstance(value.base, Load | Opaque) and value.disp == 0
            ):
                value = None
            s.regs[full] = value
        else:
            s.regs[full] = None  # partial writes keep the upper bits: unknown


def _forget_stack(s: _State, disp: int, size: int) -> None:
    """Drop the 8-byte stack slots a store of `size` bytes at rsp0 + disp overlaps."""
    for slot in [k for k in s.stack if k < disp + max(size, 1) and disp < k + 8]:
        del s.stack[slot]


def _leaves_connection(s: _State) -> bool:
    """True once the path knows that the first member it read (a 4-byte SSL + T) is not 0:
    from 3.2 that is `ssl->type != SSL_TYPE_SSL_CONNECTION`, the QUIC side of the check."""
    first = next((a for a in s.accesses if _rooted(a.addr)), None)
    if first is None or first.kind != "load" or first.size != 4 or first.addr.base != SSL.base:
        return False
    return Fact(Val(Load(first.addr, 4)), "ne", 0) in s.facts


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1 if size else 0xFFFFFFFFFFFFFFFF


# --- reading the paths ------------------------------------------------------------------------


def _field_of(value: Val | None, base: Val = SSL) -> tuple[int, int] | None:
    """(disp, size) when `value` is the load of base + disp."""
    if value is None or value.disp != 0 or not isinstance(value.base, Load):
        return None
    addr = value.base.addr
    if addr.base != base.base:
        return None
    return addr.disp - base.disp, value.base.size


def _rooted(addr: Val) -> bool:
    """True for SSL + d and for loads reached from it (SSL->p + d, ...)."""
    base = addr.base
    while isinstance(base, Load):
        base = base.addr.base
    return base == SSL.base


def _type_check(path: PathResult) -> int | None:
    """T when the path's first look at the SSL is a 4-byte load of SSL+T compared with 0."""
    first = next((a for a in path.accesses if _rooted(a.addr)), None)
    if first is None or first.kind != "load" or first.size != 4 or first.addr.base != SSL.base:
        return None
    loaded = Val(Load(first.addr, 4))
    fact = next((f for f in path.facts if f.value.base is not None and f.value != SSL), None)
    if fact is None or fact.value != loaded or fact.k != 0 or fact.op not in ("eq", "ne"):
        return None
    return first.addr.disp


@dataclass(frozen=True)
class _Function:
    """The explored paths of one accessor, reduced to the SSL_CONNECTION paths."""

    name: str
    paths: tuple[PathResult, ...]
    ssl_type: int | None  # the SSL_CONNECTION_FROM_SSL check's member, if the function has one
    consistent: bool  # False: some paths check a type and others do not (ambiguous)

    @classmethod
    def of(cls, name: str, paths: list[PathResult]) -> _Function:
        live = [p for p in paths if Fact(SSL, "eq", 0) not in p.facts]  # drop `ssl == NULL`
        checks = {_type_check(p) for p in live if any(_rooted(a.addr) for a in p.accesses)}
        if not checks:
            return cls(name, tuple(live), None, True)
        if len(checks) != 1:
            return cls(name, tuple(live), None, False)
        (t,) = checks
        if t is None:
            return cls(name, tuple(live), None, True)
        type_value = Val(Load(SSL.plus(t), 4))
        conn = tuple(p for p in live if Fact(type_value, "eq", 0) in p.facts)
        return cls(name, conn, t, True)

    def returned_field(self, sizes: tuple[int, ...]) -> int | None:
        """The member every completed path returns (loaded from the argument)."""
        returned = {p.returned for p in self.paths if p.complete}
        if len(returned) != 1:
            return None
        hit = _field_of(returned.pop())
        if hit is None or hit[1] not in sizes:
            return None
        return hit[0]

    def leaves(self, exclude: Iterable[Val] = ()) -> set[Val] | None:
        """Addresses used (read, copied or passed on) that are not themselves followed as
        pointers; None when paths disagree."""
        skip = set(exclude)
        if self.ssl_type is not None:
            skip.add(SSL.plus(self.ssl_type))
        found: set[Val] = set()
        for p in self.paths:
            used_as_base: set[Val] = set()
            for a in p.accesses:
                base = a.addr.base
                while isinstance(base, Load):
                    used_as_base.add(base.addr)
                    base = base.addr.base
            for a in p.accesses:
                if a.addr in skip or not _rooted(a.addr) or a.addr == SSL:
                    continue
                if a.kind == "load" and a.size == 8 and a.addr in used_as_base:
                    continue
                found.add(a.addr)
        return found


def _array_start(addrs: set[Val] | None, size: int) -> Val | None:
    """The start of the one array all `addrs` fall into ([start, start + size))."""
    if not addrs:
        return None
    bases = {a.base for a in addrs}
    if len(bases) != 1:
        return None
    start = min(addrs, key=lambda a: a.disp)
    if any(a.disp - start.disp >= size for a in addrs):
        return None
    return start


def _split_random(start: Val | None) -> tuple[int | None, int] | None:
    """(s3 pointer member or None when embedded, offset) for SSL->s3->x or SSL+x."""
    if start is None:
        return None
    if start.base == SSL.base:
        return None, start.disp
    hit = _field_of(Val(start.base), SSL)
    if hit is not None and hit[1] == 8:
        return hit[0], start.disp
    return None


def _stateless_flags(fn: _Function) -> Val | None:
    """The s3.flags word SSL_stateless sets and clears TLS1_FLAGS_STATELESS in."""
    set_at: set[Val] = set()
    cleared_at: set[Val] = set()
    for p in fn.paths:
        for a in p.accesses:
            if a.kind != "rmw" or a.imm is None or not _rooted(a.addr):
                continue
            if a.mnemonic == "or" and a.imm == _TLS1_FLAGS_STATELESS:
                set_at.add(a.addr)
            elif a.mnemonic == "and" and a.imm == ~_TLS1_FLAGS_STATELESS & _mask(a.size):
                cleared_at.add(a.addr)
    if len(set_at) != 1 or set_at != cleared_at:
        return None
    return set_at.pop()


def _passed_member(fn: _Function, reg: str) -> int | None:
    """The one SSL member whose address every call passing one in `reg` gets (e.g. the
    secret SSL_export_keying_material_early hands to tls13_hkdf_expand in rdx)."""
    passed = {
        a.addr
        for p in fn.paths
        for a in p.accesses
        if a.kind == "arg" and a.mnemonic == reg and a.addr.base == SSL.base and a.addr != SSL
    }
    if len(passed) != 1:
        return None
    return passed.pop().disp


# --- public API -------------------------------------------------------------------------------


def explore(code: CodeImage, entry: int, size: int = 0) -> list[PathResult]:
    """Every path of the function at `entry` (raises GiveUp when over budget).  With its
    `size` known, a jump out of it is a tail call whose arguments are recorded."""
    return _Explorer(code).explore(entry, size)


def derive_from_code(
    code: CodeImage, symbols: Mapping[str, int], sizes: Mapping[str, int] | None = None
) -> dict[str, int | bool]:
    """Offsets the accessors at `symbols` (name -> vaddr; `sizes`: name -> bytes, from the
    symbol table) use; only unambiguous ones."""
    fns: dict[str, _Function] = {}
    for name in ACCESSORS:
        if name not in symbols:
            continue
        try:
            size = (sizes or {}).get(name, 0)
            fns[name] = _Function.of(name, explore(code, symbols[name], size))
        except GiveUp:
            continue
    out: dict[str, int | bool] = {}

    ssl_fns = [fns[n] for n in SSL_ACCESSORS if n in fns]
    if not ssl_fns or not all(f.consistent for f in ssl_fns):
        ssl_fns = []
    types = {f.ssl_type for f in ssl_fns}
    if len(types) > 1:
        # Some SSL * accessors check the connection type and others do not (or check another
        # member): the connection paths cannot be told apart reliably, so nothing about the
        # connection is derived.
        types = set()
        ssl_fns = []
    if len(types) == 1 and (t := next(iter(types))) is not None:
        if sum(f.ssl_type is not None for f in ssl_fns) >= 2:
            out["ssl_type"] = t
        else:
            ssl_fns = []
    conn = {f.name: f for f in ssl_fns}

    def put(key: str, value: int | None) -> None:
        if value is not None:
            out[key] = value

    if "SSL_version" in conn:
        put("ssl_version", conn["SSL_version"].returned_field((4,)))
    if "SSL_is_server" in conn:
        put("server", conn["SSL_is_server"].returned_field((4,)))
    sessions = {
        conn[n].returned_field((8,)) for n in ("SSL_get_session", "SSL_get0_session") if n in conn
    } - {None}
    if len(sessions) == 1:
        put("session", sessions.pop())
    if "SSL_export_keying_material_early" in conn:
        fn = conn["SSL_export_keying_material_early"]
        put("early_exporter_master_secret", _passed_member(fn, "rdx"))
    _derive_s3(conn, out)

    if "SSL_SESSION_get_master_key" in fns:
        fn = fns["SSL_SESSION_get_master_key"]
        length = _unique_returned_field(fn, (4, 8))
        if length is not None:
            start = _array_start(fn.leaves(exclude=[SSL.plus(length)]), _MASTER_KEY_MAX)
            if start is not None and start.base == SSL.base and start.disp != length:
                out["session_master_key_length"] = length
                out["session_master_key"] = start.disp
    if "SSL_SESSION_get0_cipher" in fns:
        put("session_cipher", fns["SSL_SESSION_get0_cipher"].returned_field((8,)))
    if "SSL_CIPHER_get_id" in fns:
        put("cipher_id", fns["SSL_CIPHER_get_id"].returned_field((4, 8)))
    for name, (key, reg) in INTERNAL_ANCHORS.items():
        if name in fns and fns[name].consistent and fns[name].ssl_type is None:
            put(key, _passed_member(fns[name], reg))
    return out


def _unique_returned_field(fn: _Function, sizes: tuple[int, ...]) -> int | None:
    """The one member any path returns directly (other paths may return a computed value)."""
    hits = {_field_of(p.returned) for p in fn.paths if p.complete} - {None}
    if len(hits) != 1:
        return None
    disp, size = hits.pop()  # type: ignore[misc]
    return disp if size in sizes else None


def _derive_s3(conn: Mapping[str, _Function], out: dict[str, int | bool]) -> None:
    if "SSL_get_client_random" not in conn or "SSL_get_server_random" not in conn:
        return
    client = _split_random(_array_start(conn["SSL_get_client_random"].leaves(), _RANDOM_SIZE))
    server = _split_random(_array_start(conn["SSL_get_server_random"].leaves(), _RANDOM_SIZE))
    if client is None or server is None or client[0] != server[0]:
        return
    if abs(client[1] - server[1]) < _RANDOM_SIZE:
        return
    pointer = client[0]
    flags = _stateless_flags(conn["SSL_stateless"]) if "SSL_stateless" in conn else None
    if pointer is None and flags is not None and flags.base != SSL.base:
        return  # SSL_stateless reaches s3 through a pointer, the randoms say embedded
    if pointer is not None:
        if flags is not None and flags != Val(Load(SSL.plus(pointer), 8)):
            return  # SSL_stateless disagrees about where s3 is
        out.update(s3_is_pointer=True, s3=pointer)
        out.update(s3_client_random=client[1], s3_server_random=server[1])
        return
    out.update(s3_is_pointer=False, client_random=client[1], server_random=server[1])
    if flags is not None and flags.base == SSL.base:
        s3 = flags.disp
        if s3 + 8 <= min(client[1], server[1]):  # s3.flags is a long before the randoms
            out.update(s3=s3, s3_client_random=client[1] - s3, s3_server_random=server[1] - s3)


def derive_offsets(path: Path) -> dict[str, int | bool]:
    """Offsets read from the exported accessors of the libssl (or static binary) at `path`.

    Symbols come from .dynsym, then .symtab (static binaries).  Returns {} for files that
    are not x86-64 ELF or have none of the accessors.  Raises OSError if unreadable.
    """
    image = load_elf(path)
    if image is None:
        return {}
    code, symbols = image
    addresses = {name: vaddr for name, (vaddr, _) in symbols.items()}
    sizes = {name: size for name, (_, size) in symbols.items()}
    return derive_from_code(code, addresses, sizes)


# --- ELF ----------------------------------------------------------------------------------------

_STT_FUNC, _STT_GNU_IFUNC = 2, 10


def load_elf(path: Path) -> tuple[CodeImage, dict[str, tuple[int, int]]] | None:
    """The executable segments (mapped, not read), PLT ranges and accessor addresses of an
    x86-64 ELF file (name -> (vaddr, size)); None if it is not one or defines none of the
    accessors."""
    from keytap.tls.elf import PF_X, SHT_DYNSYM, SHT_SYMTAB, ElfError, ElfHeaders

    with open(path, "rb") as stream:
        if stream.read(4) != b"\x7fELF":
            return None
        stream.seek(0)
        try:
            headers = ElfHeaders(stream)
            if headers.machine != "EM_X86_64" or headers.elfclass != 64:
                return None
            external = [(s.addr, s.addr + s.size) for s in headers.sections
                        if s.name in (".plt", ".plt.sec", ".plt.got", ".iplt")]
            tables = headers.of_type(SHT_DYNSYM, SHT_SYMTAB)
            tables.sort(key=lambda sec: sec.type != SHT_DYNSYM)
            symbols: dict[str, tuple[int, int]] = {}
            for table in tables:
                missing = [n for n in ACCESSORS if n not in symbols]
                if not missing:
                    break
                strtab = headers.data(headers.sections[table.link])
                symbols.update(_find_symbols(headers.data(table), strtab, missing))
            if not symbols:
                return None
            # Code is read in place: a static binary's text can be a hundred megabytes.
            mapped = memoryview(mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ))
            segments = [
                (seg.vaddr, mapped[seg.offset : seg.offset + seg.filesz])
                for seg in headers.loads if seg.flags & PF_X
            ]
        except (ElfError, struct.error, ValueError, IndexError):
            return None
    return CodeImage(segments, external), symbols


def _find_symbols(
    symtab: bytes, strtab: bytes, names: Iterable[str]
) -> dict[str, tuple[int, int]]:
    """name -> (vaddr, size) of the defined functions among `names`, global ones first."""
    by_offset: dict[int, str] = {}
    for name in names:
        needle = name.encode() + b"\0"
        pos = strtab.find(needle)
        while pos >= 0:  # every occurrence: string tables may share tails between names
            by_offset[pos] = name
            pos = strtab.find(needle, pos + 1)
    found: dict[str, tuple[bool, int, int]] = {}
    for st_name, info, _other, shndx, value, size in struct.iter_unpack("<IBBHQQ", symtab):
        name = by_offset.get(st_name)
        if name is None or not shndx or not value or info & 0xF not in (_STT_FUNC, _STT_GNU_IFUNC):
            continue
        is_global = info >> 4 != 0
        if name not in found or (is_global and not found[name][0]):
            found[name] = (is_global, value, size)
    return {name: (vaddr, size) for name, (_, vaddr, size) in found.items()}


# --- comparing with a table layout --------------------------------------------------------------


def layout_value(layout: Layout, key: str) -> int | bool | None:
    """The table's value for a derived key (including EXTRA_FIELDS)."""
    if key in EXTRA_FIELDS:
        if layout.s3_is_pointer:
            return None
        member = layout.s3_client_random if key == "client_random" else layout.s3_server_random
        return layout.s3 + member
    return getattr(layout, key)


def mismatches(derived: Mapping[str, int | bool], layout: Layout) -> list[str]:
    """Derived keys whose value differs from `layout`'s."""
    return [k for k, v in derived.items() if layout_value(layout, k) != v]
