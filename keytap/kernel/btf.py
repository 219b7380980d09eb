"""Member offsets of kernel structs, read from the running kernel's BTF (/sys/kernel/btf/vmlinux).

keytap compiles its BPF with whatever headers are installed, often not the running kernel's, so
it must not dereference kernel structs through header definitions. The few kernel fields it
reads (the current task's network namespace, to scope key capture) are located here, from the
running kernel itself. No maintained Python library parses BTF (pyelftools reads DWARF only), and
the part needed, struct members by name, is small.
"""

from __future__ import annotations

import struct
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


class BtfError(LookupError):
    """The kernel's BTF lacks a struct or member keytap needs."""


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    members: tuple[tuple[str, int, int], ...]  # (name, type id, bit offset)


class Btf:
    """The types of one BTF blob, enough to compute member offsets."""

    def __init__(self, blob: bytes) -> None:
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            struct.unpack_from("<HBBIIIII", blob))
        if magic != BTF_MAGIC:
            raise BtfError("not a BTF blob")
        strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]
        self._types: list[_Type | None] = [None]  # type ids start at 1
        self._by_name: dict[str, int] = {}
        position, end = hdr_len + type_off, hdr_len + type_off + type_len
        while position < end:
            name_off, info, size_or_type = struct.unpack_from("<III", blob, position)
            kind, vlen, kind_flag = info >> 24 & 0x1F, info & 0xFFFF, info >> 31
            position += 12
            members: tuple[tuple[str, int, int], ...] = ()
            if kind in (KIND_STRUCT, KIND_UNION):
                members = tuple(
                    (_string(strings, m_name), m_type,
                     m_offset & 0xFFFFFF if kind_flag else m_offset)
                    for m_name, m_type, m_offset in struct.iter_unpack(
                        "<III", blob[position:position + 12 * vlen]))
            position += FIXED_EXTRA.get(kind, 0) + PER_MEMBER_EXTRA.get(kind, 0) * vlen
            name = _string(strings, name_off)
            self._types.append(_Type(kind, name, size_or_type, members))
            if kind in (KIND_STRUCT, KIND_UNION) and name and members:
                self._by_name.setdefault(name, len(self._types) - 1)

    @classmethod
    def vmlinux(cls) -> Btf:
        """The running kernel's BTF (~0.2 s, ~12 MB: keep what is needed of it, not it)."""
        try:
            return cls(VMLINUX_BTF.read_bytes())
        except OSError as error:
            raise BtfError(f"cannot read {VMLINUX_BTF}: {error.strerror}") from None

    def has_struct(self, name: str) -> bool:
        return name in self._by_name

    def offset(self, path: str) -> int:
        """Byte offset of e.g. "net.ns.inum" (members of embedded structs, by dotted path)."""
        struct_name, *member_names = path.split(".")
        if struct_name not in self._by_name:
            raise BtfError(f"kernel BTF has no struct {struct_name}")
        type_id, total_bits = self._by_name[struct_name], 0
        for member in member_names:
            found = self._find_member(self._resolve(type_id), member)
            if found is None:
                raise BtfError(f"kernel BTF: no member {member} in {path}")
            type_id, bits = found
            total_bits += bits
        return total_bits // 8

    def _resolve(self, type_id: int) -> int:
        while (t := self._types[type_id]) is not None and t.kind in MODIFIERS:
            type_id = t.size_or_type
        return type_id

    def _find_member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(type id, bit offset) of `name`, looking into anonymous struct/union members too."""
        container = self._types[type_id]
        if container is None:
            return None
        for member_name, member_type, bit_offset in container.members:
            if member_name == name:
                return member_type, bit_offset
            if not member_name:
                nested = self._find_member(self._resolve(member_type), name)
                if nested is not None:
                    return nested[0], bit_offset + nested[1]
        return None


def _string(strings: bytes, offset: int) -> str:
    return strings[offset:strings.index(b"\0", offset)].decode()
