"""The classifier's filter: libpcap's classic BPF, as C, decides like libpcap itself.

The generated C is compiled here with the host's C compiler against a stand-in for
bpf_skb_load_bytes (a bounds-checked copy, as the kernel's), run over a set of frames, and its
verdicts compared with pcap_offline_filter()'s on the same frames and program.
"""

from __future__ import annotations

import ctypes
import random
import re
import shutil
import struct
import subprocess

import pytest

from keytap.errors import BadInput
from keytap.kernel import pcapfilter
from keytap.kernel.pcapfilter import compile_expression, to_c

EXPRESSIONS = [
    "tcp port 443 or icmp", "udp", "ip6", "arp", "vlan and tcp", "tcp[tcpflags] & tcp-syn != 0",
    "ip[6:2] & 0x1fff != 0", "len > 100", "ether host 02:00:00:00:00:01", "net 10.231.0.0/16",
    "portrange 400-500", "ip[0] & 0xf > 5", "tcp[12] / 16 > 5", "tcp[12] % 7 == 3", "icmp6",
    "ip proto 47", "not tcp", "tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x16030100",
    "ip6 and tcp dst port 443", "udp and ip[2:2] - 20 > 40", "ether[0] & 1 = 1",
    "ip[2:2] - ((ip[0] & 0xf) << 2) - ((tcp[12] & 0xf0) >> 2) > 0",  # scratch memory
    "len - ip[0] > ip[2] * 2",
]
HARNESS = """
#include <stdint.h>
#include <stdio.h>
#include <string.h>
typedef uint8_t u8; typedef uint32_t u32; typedef uint64_t u64;
struct __sk_buff { u32 len; };
#define __always_inline inline
static const u8 *packet;
static int bpf_skb_load_bytes(const struct __sk_buff *skb, u32 offset, void *to, u32 len)
{
    if ((u64)offset + len > skb->len) return -14;
    memcpy(to, packet + offset, len);
    return 0;
}
%s
int main(void)
{
    static u8 frame[65536];
    u32 len;
    while (fread(&len, 4, 1, stdin) == 1 && fread(frame, 1, len, stdin) == len) {
        struct __sk_buff skb = {.len = len};
        packet = frame;
%s
        putchar('\\n');
    }
    return 0;
}
"""


def ethernet(ethertype: int, payload: bytes, vlan: bool = False) -> bytes:
    mac = bytes.fromhex("020000000001020000000002")
    tag = struct.pack("!HH", 0x8100, 7) if vlan else b""
    return mac + tag + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, payload: bytes, src: str = "10.231.0.2", fragment: int = 0,
         ihl: int = 5) -> bytes:
    options = b"\x01" * (4 * (ihl - 5))
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload), 1,
                       fragment, 64, proto, 0, bytes(map(int, src.split("."))),
                       bytes([10, 231, 0, 1])) + options + payload


def ipv6(next_header: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), next_header, 64,
                       b"\xfd" + b"\0" * 14 + b"\x01", b"\xfd" + b"\0" * 14 + b"\x02") + payload


def tcp(dport: int, flags: int = 0x02, payload: bytes = b"", offset: int = 5) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, offset << 4, flags, 65535, 0, 0) + \
        b"\0" * (4 * (offset - 5)) + payload


def frames() -> list[bytes]:
    hello = b"\x16\x03\x01\x00\x10" + b"\x01" * 16
    udp = struct.pack("!HHHH", 5353, 53, 8 + 60, 0) + b"q" * 60
    found = [
        ethernet(0x0800, ipv4(6, tcp(443))), ethernet(0x0800, ipv4(6, tcp(443, 0x18, hello))),
        ethernet(0x0800, ipv4(6, tcp(443, 0x10, hello, offset=8))),
        ethernet(0x0800, ipv4(1, b"\x08\x00" + b"\0" * 30)),
        ethernet(0x0800, ipv4(17, udp)), ethernet(0x0800, ipv4(17, udp, src="192.0.2.9")),
        ethernet(0x86DD, ipv6(6, tcp(443))), ethernet(0x86DD, ipv6(58, b"\x80\0" + b"\0" * 20)),
        ethernet(0x0806, b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\0" * 20),
        ethernet(0x0800, ipv4(6, tcp(443)), vlan=True), ethernet(0x0800, ipv4(6, tcp(450))),
        ethernet(0x0800, ipv4(6, tcp(80), fragment=0x2000 | 3)),
        ethernet(0x0800, ipv4(47, b"\0" * 8, ihl=7)), ethernet(0x0800, ipv4(6, tcp(443))[:30]),
        b"\x01" + ethernet(0x0800, ipv4(1, b""))[1:], b"\x02" * 10, b"",
    ]
    rng = random.Random(8446)
    found += [rng.randbytes(rng.randrange(1, 120)) for _ in range(40)]
    found += [frame[: rng.randrange(len(frame))] for frame in found[:14] for _ in range(3)]
    return found


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Per frame, one character per expression: '1' accepted, '0' rejected."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "these tests compile the generated filter: apt-get install gcc"
    directory = tmp_path_factory.mktemp("filter")
    functions = "".join(to_c(compile_expression(e, 262144), f"filter{i}")
                        for i, e in enumerate(EXPRESSIONS))
    calls = "\n".join(f"        putchar(filter{i}(&skb) ? '1' : '0');"
                      for i in range(len(EXPRESSIONS)))
    (directory / "harness.c").write_text(HARNESS % (functions, calls))
    subprocess.run([compiler, "-O1", "-w", "-o", str(directory / "harness"),
                    str(directory / "harness.c")], check=True)
    data = b"".join(struct.pack("<I", len(f)) + f for f in frames())
    return subprocess.run([str(directory / "harness")], input=data, capture_output=True,
                          check=True).stdout.decode().splitlines()


def libpcap_verdicts(expression: str) -> str:
    lib = pcapfilter._libpcap()
    handle = lib.pcap_open_dead(pcapfilter.DLT_EN10MB, 262144)
    program = pcapfilter._BpfProgram()
    assert lib.pcap_compile(handle, ctypes.byref(program), expression.encode(), 1,
                            pcapfilter.PCAP_NETMASK_UNKNOWN) == 0

    class Header(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long),
                    ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]

    lib.pcap_offline_filter.argtypes = [ctypes.POINTER(pcapfilter._BpfProgram),
                                        ctypes.POINTER(Header), ctypes.c_char_p]
    try:
        return "".join("1" if lib.pcap_offline_filter(ctypes.byref(program), ctypes.byref(
            Header(0, 0, len(f), len(f))), f) else "0" for f in frames())
    finally:
        lib.pcap_freecode(ctypes.byref(program))
        lib.pcap_close(handle)


@pytest.mark.parametrize("index", range(len(EXPRESSIONS)), ids=EXPRESSIONS)
def test_generated_c_decides_as_libpcap(ours: list[str], index: int) -> None:
    expected = libpcap_verdicts(EXPRESSIONS[index])
    assert "".join(line[index] for line in ours) == expected
    assert "1" in expected and "0" in expected  # the frames exercise both outcomes


def test_an_invalid_expression_is_one_line_naming_it() -> None:
    with pytest.raises(BadInput, match=r"filter expression 'tcp port': .*syntax error"):
        compile_expression("tcp port", 262144)
    with pytest.raises(BadInput, match="filter expression 'tcp port 99999'"):
        compile_expression("tcp port 99999", 262144)


def test_program_shape() -> None:
    source = to_c(compile_expression("icmp", 262144))
    assert source.startswith("static __always_inline u32 packet_filter(struct __sk_buff *skb)")
    assert "M[" not in source  # no scratch memory unless the program uses it
    assert "M[16]" in to_c(compile_expression(EXPRESSIONS[-1], 262144))


def test_jumps_only_forward() -> None:
    for expression in EXPRESSIONS:
        for line in to_c(compile_expression(expression, 262144)).splitlines():
            label, _, statement = line.partition(": ")
            targets = re.findall(r"goto L(\d+)", statement)
            assert all(int(t) > int(label[1:]) for t in targets), line
