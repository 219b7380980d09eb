"""tlswire: classification of frames built with scapy, canonical flow keys, garbage robustness."""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
from scapy.layers.l2 import Dot1Q, Ether
from scapy.layers.tls.handshake import TLSClientHello, TLSServerHello
from scapy.layers.tls.record import TLS, TLSAlert, TLSApplicationData, TLSChangeCipherSpec
from scapy.packet import Raw

from keytap.merge.tlswire import TCP_FIN, TCP_RST, TCP_SYN, FlowKey, Kind, WireInfo, classify
from tests.support.rfc8448 import RFC8448_CLIENT_HELLO, RFC8448_CLIENT_RANDOM, RFC8448_SERVER_HELLO


def record(content_type: int, body: bytes, version: int = 0x0303) -> bytes:
    return bytes([content_type]) + version.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


CH_RECORD = record(22, RFC8448_CLIENT_HELLO, version=0x0301)
SH_RECORD = record(22, RFC8448_SERVER_HELLO)

# Explicit MACs: with none, scapy resolves IPv6 neighbours (a timeout per frame).
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
CLIENT4, SERVER4 = "10.244.1.7", "10.96.0.10"
CLIENT6, SERVER6 = "fd00::7", "fd00::a"


def _frame(ip_cls, client: str, server: str, payload: bytes, reply: bool, flags: str) -> bytes:
    if reply:
        pkt = ETH / ip_cls(src=server, dst=client) / TCP(sport=443, dport=51000, flags=flags)
    else:
        pkt = ETH / ip_cls(src=client, dst=server) / TCP(sport=51000, dport=443, flags=flags)
    return bytes(pkt / Raw(payload)) if payload else bytes(pkt)


def v4(payload: bytes = b"", *, reply: bool = False, flags: str = "PA") -> bytes:
    return _frame(IP, CLIENT4, SERVER4, payload, reply, flags)


def v6(payload: bytes = b"", *, reply: bool = False, flags: str = "PA") -> bytes:
    return _frame(IPv6, CLIENT6, SERVER6, payload, reply, flags)


def must(frame: bytes) -> WireInfo:
    info = classify(frame)
    assert info is not None
    return info


@pytest.mark.parametrize("build", [v4, v6])
def test_client_hello_gives_random(build) -> None:
    info = must(build(CH_RECORD))
    assert info.kind is Kind.CLIENT_HELLO
    assert info.client_random == RFC8448_CLIENT_RANDOM
    assert info.payload_len == len(CH_RECORD)


@pytest.mark.parametrize("build", [v4, v6])
def test_server_hello_ccs_appdata_alert(build) -> None:
    assert must(build(SH_RECORD, reply=True)).kind is Kind.SERVER_HELLO
    assert must(build(record(20, b"\x01"))).kind is Kind.CHANGE_CIPHER_SPEC
    assert must(build(record(23, b"\xaa" * 100))).kind is Kind.APPLICATION_DATA
    assert must(build(record(21, b"\x02\x28"))).kind is Kind.OTHER_TLS
    # TLS 1.2 encrypted Finished: a handshake record whose "type" is ciphertext.
    assert must(build(record(22, b"\x9c" * 40))).kind is Kind.OTHER_TLS
    assert must(build(SH_RECORD, reply=True)).client_random is None


def test_scapy_built_tls_records() -> None:
    rnd = bytes(range(100, 132))
    ch = TLSClientHello(
        gmt_unix_time=int.from_bytes(rnd[:4], "big"), random_bytes=rnd[4:], ciphers=[0x1301]
    )
    info = must(v4(bytes(TLS(msg=[ch]))))
    assert (info.kind, info.client_random) == (Kind.CLIENT_HELLO, rnd)
    assert must(v4(bytes(TLS(msg=[TLSServerHello()])), reply=True)).kind is Kind.SERVER_HELLO
    assert must(v4(bytes(TLS(msg=[TLSChangeCipherSpec()])))).kind is Kind.CHANGE_CIPHER_SPEC
    appdata = bytes(TLS(type=23, msg=[TLSApplicationData(data=b"GET / HTTP/1.1")]))
    assert must(v4(appdata)).kind is Kind.APPLICATION_DATA
    assert must(v4(bytes(TLS(msg=[TLSAlert(level=2, descr=40)])))).kind is Kind.OTHER_TLS


def test_tls_recognized_on_any_port() -> None:
    frame = bytes(
        ETH / IP(src="1.2.3.4", dst="5.6.7.8") / TCP(sport=40000, dport=8080) / Raw(CH_RECORD)
    )
    assert must(frame).client_random == RFC8448_CLIENT_RANDOM


def test_plain_and_empty() -> None:
    http = must(v4(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert http.kind is Kind.PLAIN and http.client_random is None
    syn = must(v4(flags="S"))
    assert syn.kind is Kind.EMPTY and syn.tcp_flags & TCP_SYN and syn.payload_len == 0
    # Looks like a record header but with an impossible version or length.
    assert must(v4(b"\x16\x02\x00\x00\x10" + b"\x01" * 16)).kind is Kind.PLAIN
    assert must(v4(b"\x17\x03\x03\xff\xff" + b"\x01" * 16)).kind is Kind.PLAIN
    assert must(v4(b"\x17\x03\x03\x00\x00")).kind is Kind.PLAIN
    assert must(v4(b"\x17\x03")).kind is Kind.PLAIN


def test_ethernet_padding_is_not_payload() -> None:
    # A bare ACK is padded to the 60-byte Ethernet minimum; IP's total length says no payload.
    frame = v4(flags="A")
    padded = frame + b"\x17\x03\x03\x00\x05"
    assert len(frame) == 54
    info = must(padded)
    assert info.kind is Kind.EMPTY and info.payload_len == 0


@pytest.mark.parametrize("build", [v4, v6])
def test_flow_key_is_canonical_in_both_directions(build) -> None:
    out = must(build(CH_RECORD))
    back = must(build(SH_RECORD, reply=True))
    assert out.flow == back.flow
    assert hash(out.flow) == hash(back.flow)
    assert out.from_a != back.from_a
    other = must(build(CH_RECORD, flags="PA"))
    assert other.flow == out.flow


def test_flow_key_order_and_str() -> None:
    a = FlowKey.of(bytes([10, 0, 0, 2]), 80, bytes([10, 0, 0, 1]), 5000)
    b = FlowKey.of(bytes([10, 0, 0, 1]), 5000, bytes([10, 0, 0, 2]), 80)
    assert a == b and a.addr_a == bytes([10, 0, 0, 1]) and a.port_a == 5000
    # Same address: the port decides.
    c = FlowKey.of(b"\x7f\x00\x00\x01", 9000, b"\x7f\x00\x00\x01", 443)
    assert (c.port_a, c.port_b) == (443, 9000)
    assert str(a) == "10.0.0.1:5000 <-> 10.0.0.2:80"
    info = must(v6(CH_RECORD))
    assert str(info.flow) == "[fd00::7]:51000 <-> [fd00::a]:443"
    # Different connections stay different.
    d = FlowKey.of(bytes([10, 0, 0, 1]), 5001, bytes([10, 0, 0, 2]), 80)
    assert d != a


def test_fin_and_rst() -> None:
    fin = must(v4(record(21, b"\x01\x00"), flags="FA"))
    assert fin.tcp_flags & (TCP_FIN | TCP_RST) == TCP_FIN and fin.kind is Kind.OTHER_TLS
    rst = must(v4(reply=True, flags="R"))
    assert rst.tcp_flags & (TCP_FIN | TCP_RST) == TCP_RST
    assert not must(v4(flags="A")).tcp_flags & (TCP_FIN | TCP_RST)


def test_vlan_tagged_frames() -> None:
    frame = bytes(
        ETH
        / Dot1Q(vlan=10)
        / Dot1Q(vlan=20)
        / IP(src=CLIENT4, dst=SERVER4)
        / TCP()
        / Raw(CH_RECORD)
    )
    assert must(frame).client_random == RFC8448_CLIENT_RANDOM


def test_ipv4_options_and_ipv6_extension_headers() -> None:
    with_opts = bytes(
        ETH / IP(src=CLIENT4, dst=SERVER4, options=b"\x01\x01\x01\x00") / TCP() / Raw(CH_RECORD)
    )
    assert must(with_opts).client_random == RFC8448_CLIENT_RANDOM
    ext = bytes(ETH / IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrDestOpt() / TCP() / Raw(CH_RECORD))
    assert must(ext).client_random == RFC8448_CLIENT_RANDOM
    first_fragment = bytes(
        ETH
        / IPv6(src=CLIENT6, dst=SERVER6)
        / IPv6ExtHdrFragment(offset=0, m=1)
        / TCP()
        / Raw(CH_RECORD)
    )
    assert must(first_fragment).kind is Kind.CLIENT_HELLO


def test_tcp_options_are_skipped() -> None:
    frame = bytes(
        ETH
        / IP(src=CLIENT4, dst=SERVER4)
        / TCP(options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("WScale", 7)])
        / Raw(CH_RECORD)
    )
    assert must(frame).client_random == RFC8448_CLIENT_RANDOM


def test_non_tcp_and_non_ip_give_none() -> None:
    from scapy.layers.inet import ICMP, UDP
    from scapy.layers.l2 import ARP

    assert classify(bytes(ETH / IP() / UDP(sport=443, dport=443) / Raw(CH_RECORD))) is None
    assert classify(bytes(ETH / IP() / ICMP())) is None
    assert classify(bytes(ETH / ARP())) is None
    later_fragment = bytes(ETH / IP(frag=100, proto=6) / Raw(CH_RECORD))
    assert classify(later_fragment) is None
    v6_later_fragment = bytes(ETH / IPv6() / IPv6ExtHdrFragment(offset=100, nh=6) / Raw(CH_RECORD))
    assert classify(v6_later_fragment) is None


def test_snapped_client_hello() -> None:
    frame = v4(CH_RECORD)
    header = 14 + 20 + 20
    # Snapped after the random: still fine, the random is in the first 43 bytes.
    assert must(frame[: header + 43]).client_random == RFC8448_CLIENT_RANDOM
    # Snapped inside the random: recognized as a ClientHello, but no identity.
    short = must(frame[: header + 30])
    assert short.kind is Kind.CLIENT_HELLO and short.client_random is None
    assert short.payload_len == len(CH_RECORD)  # from the IP header, not the captured bytes


def test_garbage_never_raises() -> None:
    rng = random.Random(8448)
    good = [v4(CH_RECORD), v6(CH_RECORD), v4(SH_RECORD, reply=True), v6(flags="S")]
    for _ in range(3000):
        base = bytearray(rng.choice(good))
        op = rng.randrange(3)
        if op == 0:
            base = base[: rng.randrange(len(base) + 1)]
        elif op == 1:
            for _ in range(rng.randrange(1, 8)):
                base[rng.randrange(len(base))] = rng.randrange(256)
        else:
            base = bytearray(rng.randbytes(rng.randrange(0, 200)))
        frame = bytes(base)
        assert classify(frame) is None or isinstance(classify(frame), WireInfo)
    for frame in (b"", b"\x00", bytes(14), bytes(13), b"\xff" * 2000):
        assert classify(frame) is None or isinstance(classify(frame), WireInfo)


def test_header_lengths_lying_about_size() -> None:
    frame = bytearray(v4(CH_RECORD))
    frame[14] = 0x4F  # IHL 60 bytes: TCP header now points into the payload
    classify(bytes(frame))
    frame = bytearray(v4(CH_RECORD))
    frame[14 + 20 + 12] = 0xF0  # TCP data offset 60 bytes
    info = classify(bytes(frame))
    assert info is None or info.kind is not Kind.CLIENT_HELLO or info.client_random is not None
    frame = bytearray(v4(CH_RECORD))
    frame[14 + 20 + 12] = 0x10  # TCP data offset 4 bytes: invalid
    assert classify(bytes(frame)) is None
    frame = bytearray(v4(CH_RECORD))
    frame[16:18] = b"\xff\xff"  # IP total length beyond the frame
    assert must(bytes(frame)).client_random == RFC8448_CLIENT_RANDOM
