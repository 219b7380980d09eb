"""kernel.btf on a small BTF blob made here: struct lookup and member offsets."""

from __future__ import annotations

import struct

import pytest

from keytap.kernel import btf as btf_module
from keytap.kernel.btf import KIND_STRUCT, Btf, BtfError

INT_KIND = 1


def blob() -> bytes:
    """BTF with `int` (id 1) and struct outer { int a; int b; } (id 2)."""
    strings = b"\0int\0outer\0a\0b\0"
    name = {text: strings.index(text.encode() + b"\0") for text in ("int", "outer", "a", "b")}
    types = struct.pack("<III", name["int"], INT_KIND << 24, 4) + struct.pack("<I", 32)
    types += struct.pack("<III", name["outer"], KIND_STRUCT << 24 | 2, 8)
    types += struct.pack("<III", name["a"], 1, 0) + struct.pack("<III", name["b"], 1, 32)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                         len(strings))
    return header + types + strings


def test_structs_are_found_by_name_and_members_by_offset() -> None:
    btf = Btf(blob())
    assert btf.has_struct("outer") and not btf.has_struct("bpf_uprobe_multi_link")
    assert btf.offset("outer.a") == 0 and btf.offset("outer.b") == 4


def test_a_missing_member_or_struct_is_a_btf_error() -> None:
    btf = Btf(blob())
    with pytest.raises(BtfError, match="no member c"):
        btf.offset("outer.c")
    with pytest.raises(BtfError, match="no struct inner"):
        btf.offset("inner.x")


def test_kernel_facts_say_what_is_missing(tmp_path, monkeypatch) -> None:
    """A kernel whose BTF lacks the namespace structs: the error names one; no uprobe_multi."""
    path = tmp_path / "vmlinux"
    path.write_bytes(blob())
    monkeypatch.setattr(btf_module, "VMLINUX_BTF", path)
    btf_module.kernel_facts.cache_clear()
    try:
        facts = btf_module.kernel_facts()
    finally:
        btf_module.kernel_facts.cache_clear()
    assert facts.namespace_offsets is None and "no struct task_struct" in facts.namespace_error
    assert not facts.uprobe_multi
