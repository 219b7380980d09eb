"""The kernel ABI: bpf/*.c and keytap.kernel.abi describe the same records, enums and sizes."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from keytap.events import Direction
from keytap.kernel import abi
from keytap.kernel.loader import BPF_SOURCE_DIR

C_FORMATS = {"u64": "Q", "u32": "I", "s32": "i"}


def source(name: str) -> str:
    return (BPF_SOURCE_DIR / name).read_text()


def struct_fields(text: str, name: str) -> list[tuple[str, str]]:
    body = re.search(rf"struct {name} \{{(.*?)\}};", text, re.S)
    assert body is not None, f"struct {name} not found"
    return re.findall(r"^\s*(\w+)\s+(\w+)(?:\[\w+\])?;", body.group(1), re.M)


def test_packet_header_matches_the_struct_format() -> None:
    fields = struct_fields(source("capture.c"), "packet_header")
    assert [name for _, name in fields] == list(abi.PACKET_HEADER_FIELDS)
    fmt = "<" + "".join(C_FORMATS[kind] for kind, _ in fields)
    assert struct.calcsize(fmt) == abi.PACKET_HEADER.size
    assert fmt.replace("i", "I") == abi.PACKET_HEADER.format


@pytest.mark.parametrize(("name", "struct_name", "defines", "layout", "event"), [
    ("tls.c", "secrets_event", abi.tls_defines(), abi.SECRETS_EVENT, abi.SecretsEvent),
    ("go_tls.c", "go_secret_event", abi.go_tls_defines(), abi.GO_SECRET_EVENT,
     abi.GoSecretEvent),
])
def test_key_events_match_the_structs(name: str, struct_name: str, defines: dict[str, int],
                                      layout: struct.Struct, event: type) -> None:
    """The key sources unpack each record with one struct format: every field, every array's
    size, and no padding the C compiler would add."""
    body = re.search(rf"struct {struct_name} \{{(.*?)\}};", source(name), re.S)
    assert body is not None
    fields = re.findall(r"^\s*(\w+)\s+(\w+)(?:\[(\w+)\])?;", body.group(1), re.M)
    fmt = "<"
    for kind, _, size in fields:
        if size:
            assert kind in ("u8", "char")
            fmt += f"{defines.get(size) or int(size)}s"
        else:
            fmt += C_FORMATS[kind]
    assert tuple(field for _, field, _ in fields) == event._fields
    assert fmt == layout.format
    # C's alignment (native, to the largest member at the end) adds no padding anywhere
    assert struct.calcsize("@" + fmt[1:] + "0Q") == layout.size


def test_directions_match_the_enum() -> None:
    enum = re.search(r"enum direction \{(.*?)\}", source("capture.c"), re.S)
    assert enum is not None
    values = dict(re.findall(r"DIR_(\w+) = (\d+)", enum.group(1)))
    assert {name: int(v) for name, v in values.items()} == {
        "INBOUND": Direction.INBOUND, "OUTBOUND": Direction.OUTBOUND}


def test_layout_fields_are_the_struct_in_order() -> None:
    fields = struct_fields(source("tls.c"), "layout")
    assert {kind for kind, _ in fields} == {"s32"}
    assert tuple(name for _, name in fields) == abi.LAYOUT_FIELDS


def test_counters_are_the_enum_in_order() -> None:
    enum = re.search(r"enum counter \{(.*?)\}", source("tls.c"), re.S)
    assert enum is not None
    names = [n.strip().lower() for n in enum.group(1).split(",")]
    assert tuple(names[:-1]) == abi.KEY_COUNTERS and names[-1] == "counters"


def test_one_program_serves_every_group_and_build_by_its_cookie() -> None:
    """No per-library copies of a program (they were most of the start-up's compile time)."""
    for name, programs in (("tls.c", ("ssl_call", "ssl_hs_return")),
                           ("go_tls.c", ("go_key_log_registers", "go_key_log_stack"))):
        text = source(name)
        for program in programs:
            start = text.find(f"int {program}(struct pt_regs *ctx)")
            assert start >= 0, f"{name} has no program {program}"
            definition = text[start:text.find("\n\n", start)]
            assert "bpf_get_attach_cookie(ctx)" in definition, program
        assert not re.search(r"##", text), f"{name} still pastes program names per copy"


def test_sizes_come_only_from_the_defines() -> None:
    """No fallback value in C could silently disagree with Python."""
    for name, defines in (("capture.c", abi.capture_defines(1, 1)),
                          ("tls.c", abi.tls_defines()), ("go_tls.c", abi.go_tls_defines())):
        text = source(name)
        for define in defines:
            assert not re.search(rf"#define {define}\b", text), f"{name} defines {define}"
            assert re.search(rf"defined\({define}\)", text), f"{name} does not require {define}"
    assert abi.LAYOUT_SLOTS >= abi.LIBRARY_GROUPS * 1 and abi.CANDIDATES >= 1


def test_bpf_sources_are_where_the_loader_looks() -> None:
    assert Path(BPF_SOURCE_DIR, "capture.c").is_file() and Path(BPF_SOURCE_DIR, "tls.c").is_file()


def test_go_programs_match_the_builds_and_counters() -> None:
    text = source("go_tls.c")
    enum = re.search(r"enum go_counter \{(.*?)\}", text, re.S)
    assert enum is not None
    names = [n.strip().lower().removeprefix("go_") for n in enum.group(1).split(",")]
    assert tuple(names[:-1]) == abi.GO_COUNTERS and names[-1] == "counters"
    for define in abi.go_tls_defines():
        assert not re.search(rf"#define {define}\b", text)
        assert re.search(rf"defined\({define}\)", text)
    assert abi.GO_FIRST_SLOT >= abi.LAYOUT_SLOTS  # Go's slots never name an OpenSSL layout


def test_go_event_fields_fit_their_sizes() -> None:
    fields = struct_fields(source("go_tls.c"), "go_secret_event")
    assert [name for _, name in fields] == [
        "ktime_ns", "function_address", "return_address", "tgid", "build", "label_len",
        "secret_len", "label", "client_random", "secret", "comm"]
    assert len("CLIENT_HANDSHAKE_TRAFFIC_SECRET") <= abi.GO_LABEL_SIZE
    assert abi.GO_SECRET_SIZE >= 48  # SHA-384 secrets, TLS 1.2 master secrets
