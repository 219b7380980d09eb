"""Member offsets of kernel structs, read from the running kernel's BTF (/sys/kernel/btf/vmlinux).

keytap compiles its BPF with whatever headers are installed, often not the running kernel's, so
it must not dereference kernel structs through header definitions. The few kernel facts it needs
(where the current task's network namespace is, to scope key capture; whether uprobe_multi links
exist) are read here, from the running kernel itself, once per capture. No maintained Python
library parses BTF (pyelftools reads DWARF only), and the part needed, struct members by name,
is small.
"""

from __future__ import annotations

import functools
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
KIND_STRUCT, KIND_UNION, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST = 4, 5, 8, 9, 10
KIND_RESTRICT, KIND_TYPE_TAG = 11, 18
# bytes that follow each kind's 12-byte header: fixed, or per member (vlen)
FIXED_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}
PER_MEMBER_EXTRA = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}
_FIXED = [FIXED_EXTRA.get(kind, 0) for kind in range(32)]
_PER_MEMBER = [PER_MEMBER_EXTRA.get(kind, 0) for kind in range(32)]
_TYPE_HEADER = struct.Struct("<III")
NAMESPACE_PATHS = {"TASK_NSPROXY": "task_struct.nsproxy", "NSPROXY_NET_NS": "nsproxy.net_ns",
                   "NET_NS_INUM": "net.ns.inum"}


class BtfError(LookupError):
    """The kernel's BTF lacks a struct or member keytap needs."""


class Btf:
    """The types of one BTF blob, enough to compute member offsets. One pass records where each
    type is; names and members are decoded only for the types asked about (the kernel has
    ~130k types: decoding them all took ~0.25 s of every start)."""

    def __init__(self, blob: bytes) -> None:
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            struct.unpack_from("<HBBIIIII", blob))
        if magic != BTF_MAGIC:
            raise BtfError("not a BTF blob")
        self._blob = blob
        self._strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]
        # per type id (ids start at 1): info word, size or referenced type, where its members are
        self._info, self._size_or_type = array("I", [0]), array("I", [0])
        self._members_at, self._name_at = array("I", [0]), array("I", [0])
        position, end = hdr_len + type_off, hdr_len + type_off + type_len
        while position < end:
            name_off, info, size_or_type = _TYPE_HEADER.unpack_from(blob, position)
            position += 12
            self._info.append(info)
            self._size_or_type.append(size_or_type)
            self._members_at.append(position)
            self._name_at.append(name_off)
            kind = info >> 24 & 0x1F
            position += _FIXED[kind] + _PER_MEMBER[kind] * (info & 0xFFFF)
        self._structs: dict[str, int] | None = None

    @classmethod
    def vmlinux(cls) -> Btf:
        """The running kernel's BTF (~6 MB: keep what is needed of it, not it)."""
        try:
            return cls(VMLINUX_BTF.read_bytes())
        except OSError as error:
            raise BtfError(f"cannot read {VMLINUX_BTF}: {error.strerror}") from None

    def has_struct(self, name: str) -> bool:
        return name in self._struct_ids()

    def offset(self, path: str) -> int:
        """Byte offset of e.g. "net.ns.inum" (members of embedded structs, by dotted path)."""
        struct_name, *member_names = path.split(".")
        type_id = self._struct_ids().get(struct_name)
        if type_id is None:
            raise BtfError(f"kernel BTF has no struct {struct_name}")
        total_bits = 0
        for member in member_names:
            found = self._find_member(self._resolve(type_id), member)
            if found is None:
                raise BtfError(f"kernel BTF: no member {member} in {path}")
            type_id, bits = found
            total_bits += bits
        return total_bits // 8

    def _kind(self, type_id: int) -> int:
        return self._info[type_id] >> 24 & 0x1F

    def _struct_ids(self) -> dict[str, int]:
        """Structs and unions with members, by name (the first of a name)."""
        if self._structs is None:
            self._structs = {}
            for type_id in range(len(self._info) - 1, 0, -1):  # the first id of a name wins
                has_members = self._info[type_id] & 0xFFFF
                if has_members and self._kind(type_id) in (KIND_STRUCT, KIND_UNION):
                    name = self._string(self._name_at[type_id])
                    if name:
                        self._structs[name] = type_id
        return self._structs

    def _resolve(self, type_id: int) -> int:
        while 0 < type_id < len(self._info) and self._kind(type_id) in MODIFIERS:
            type_id = self._size_or_type[type_id]
        return type_id

    def _members(self, type_id: int) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of a struct's or union's members."""
        if not 0 < type_id < len(self._info) or self._kind(type_id) not in (KIND_STRUCT,
                                                                             KIND_UNION):
            return []
        info, start = self._info[type_id], self._members_at[type_id]
        bitfields = info >> 31
        return [(self._string(name_off), member_type,
                 offset & 0xFFFFFF if bitfields else offset)
                for name_off, member_type, offset in _TYPE_HEADER.iter_unpack(
                    self._blob[start:start + 12 * (info & 0xFFFF)])]

    def _find_member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(type id, bit offset) of `name`, looking into anonymous struct/union members too."""
        for member_name, member_type, bit_offset in self._members(type_id):
            if member_name == name:
                return member_type, bit_offset
            if not member_name:
                nested = self._find_member(self._resolve(member_type), name)
                if nested is not None:
                    return nested[0], bit_offset + nested[1]
        return None

    def _string(self, offset: int) -> str:
        return self._strings[offset:self._strings.index(b"\0", offset)].decode()


@dataclass(frozen=True)
class KernelFacts:
    """What keytap needs from the running kernel's BTF."""

    namespace_offsets: dict[str, int] | None  # -D defines for bpf/scope.h; None: see error
    namespace_error: str | None
    uprobe_multi: bool  # uprobe_multi links exist (Linux 6.6+)


@functools.cache
def kernel_facts() -> KernelFacts:
    """Read once per process; the parsed BTF itself is let go."""
    try:
        btf = Btf.vmlinux()
    except BtfError as error:
        return KernelFacts(None, str(error), False)
    try:
        offsets, problem = {name: btf.offset(path) for name, path in NAMESPACE_PATHS.items()}, None
    except BtfError as error:
        offsets, problem = None, str(error)
    return KernelFacts(offsets, problem, btf.has_struct("bpf_uprobe_multi_link"))
