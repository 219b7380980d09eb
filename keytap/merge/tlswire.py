"""Recognize TLS on the wire from the bytes of a frame, not from port numbers.

The reorder buffer calls `classify` once for every captured packet, so this is the hot path:
headers are parsed by hand with `struct`/indexing (scapy takes tens of microseconds per packet
to dissect, two orders of magnitude too slow here), only the fields needed are read, the TCP
payload is never copied, and nothing raises: truncated (snapped) or garbage input yields `None`
or a less specific classification, never an exception.

Only the first bytes of a TCP segment are looked at. A ClientHello's random sits at a fixed
offset in the first segment (record header 5 + handshake header 4 + version 2 = 11 bytes in),
so reassembly is never needed to learn a session's identity.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import NamedTuple

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_PORTS = struct.Struct("!HH")

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
_VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))  # 802.1Q, 802.1ad, old QinQ
_IPPROTO_TCP = 6
_IPV6_FRAGMENT = 44
_IPV6_AH = 51
_IPV6_EXT = frozenset((0, 43, 60, _IPV6_FRAGMENT, _IPV6_AH))  # hop-by-hop, routing, dest. opts
_MAX_IPV6_EXT = 8

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04

_CT_CHANGE_CIPHER_SPEC = 20
_CT_HANDSHAKE = 22
_CT_APPLICATION_DATA = 23
_CT_HEARTBEAT = 24
_HS_CLIENT_HELLO = 1
_HS_SERVER_HELLO = 2
MAX_RECORD_LEN = 2**14 + 2048  # RFC 5246 6.2.3: the largest TLSCiphertext fragment
_RANDOM_OFF = 11  # record header (5) + handshake header (4) + client_version (2)
_RANDOM_LEN = 32


class Kind(enum.Enum):
    """What the start of a TCP segment's payload is."""

    CLIENT_HELLO = "client_hello"
    SERVER_HELLO = "server_hello"
    CHANGE_CIPHER_SPEC = "change_cipher_spec"
    APPLICATION_DATA = "application_data"
    OTHER_TLS = "other_tls"  # alert, heartbeat, or another (possibly encrypted) handshake record
    PLAIN = "plain"  # payload that does not start with a TLS record header
    EMPTY = "empty"  # no payload: SYN, pure ACK, FIN, RST


class FlowKey(NamedTuple):
    """A TCP connection, the same for both directions: endpoint a is the smaller (addr, port).

    Addresses are packed (4 bytes for IPv4, 16 for IPv6), so the two families never collide.
    A NamedTuple, as WireInfo: one is made for every packet and looked up in dicts, and a
    tuple's construction, hash and equality run in C.
    """

    addr_a: bytes
    port_a: int
    addr_b: bytes
    port_b: int

    @classmethod
    def of(cls, src: bytes, sport: int, dst: bytes, dport: int) -> FlowKey:
        """The canonical key of a packet going src:sport -> dst:dport."""
        if (src, sport) <= (dst, dport):
            return cls(src, sport, dst, dport)
        return cls(dst, dport, src, sport)

    def __str__(self) -> str:
        return f"{_endpoint(self.addr_a, self.port_a)} <-> {_endpoint(self.addr_b, self.port_b)}"


def _endpoint(addr: bytes, port: int) -> str:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return f"{addr.hex()}:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class WireInfo(NamedTuple):
    """Classification of one TCP packet.

    A NamedTuple rather than a frozen dataclass: one is built per packet and a NamedTuple is
    several times cheaper to construct, while being just as immutable.
    """

    flow: FlowKey
    kind: Kind
    client_random: bytes | None  # set for a CLIENT_HELLO whose random was captured
    payload_len: int  # TCP payload length per the IP header (may exceed the captured bytes)
    tcp_flags: int
    from_a: bool  # the packet goes from flow.addr_a:port_a to flow.addr_b:port_b
    tcp_at: int  # where the TCP header starts in the frame (for `segment_of`)


class TcpSegment(NamedTuple):
    """One TCP segment's place in its byte stream: what reassembly needs and `classify` skips."""

    flow: FlowKey
    from_a: bool  # the segment goes from flow.addr_a:port_a to flow.addr_b:port_b
    seq: int  # the TCP sequence number (of the SYN itself when SYN is set)
    flags: int
    payload: bytes  # the captured payload: shorter than `length` when the frame was snapped
    length: int  # the payload length per the IP header


def classify(frame: bytes) -> WireInfo | None:
    """Classify an Ethernet frame (optionally VLAN-tagged); None unless it is IPv4/IPv6 + TCP."""
    try:
        return _parse(frame)
    except (IndexError, struct.error, ValueError):  # belt and braces: bounds are checked
        return None


def segment_of(frame: bytes, info: WireInfo) -> TcpSegment:
    """The TCP segment of a frame `classify` took for `info`: its headers are not walked again
    (the reorder buffer classifies every packet, and records a TLS session's first ones)."""
    tcp = info.tcp_at
    p = tcp + (frame[tcp + 12] >> 4) * 4  # classify checked the data offset
    return TcpSegment(info.flow, info.from_a, _U32.unpack_from(frame, tcp + 4)[0],
                      info.tcp_flags, bytes(frame[p : min(p + info.payload_len, len(frame))]),
                      info.payload_len)


def tcp_segment(frame: bytes) -> TcpSegment | None:
    """The TCP segment in an Ethernet frame (as `classify` parses it), or None."""
    info = classify(frame)
    return None if info is None else segment_of(frame, info)


def _parse(buf: bytes) -> WireInfo | None:
    """The header walk behind `classify`: an Ethernet frame, optionally VLAN-tagged."""
    n = len(buf)
    if n < 14:
        return None
    ethertype = (buf[12] << 8) | buf[13]
    off = 14
    tags = 0
    while ethertype in _VLAN_TPIDS and tags < 2:
        if n < off + 4:
            return None
        ethertype = (buf[off + 2] << 8) | buf[off + 3]
        off += 4
        tags += 1

    if ethertype == ETH_P_IP:
        if n < off + 20 or buf[off] >> 4 != 4:
            return None
        ihl = (buf[off] & 0x0F) * 4
        if ihl < 20 or buf[off + 9] != _IPPROTO_TCP:
            return None
        if _U16.unpack_from(buf, off + 6)[0] & 0x1FFF:
            return None  # not the first fragment: no TCP header here
        total = _U16.unpack_from(buf, off + 2)[0]
        # tot_len is 0 for GSO/BIG TCP super-packets; then the captured bytes are all we know.
        end = off + total if total >= ihl else n
        src = buf[off + 12 : off + 16]
        dst = buf[off + 16 : off + 20]
        l4 = off + ihl
    elif ethertype == ETH_P_IPV6:
        if n < off + 40 or buf[off] >> 4 != 6:
            return None
        plen = _U16.unpack_from(buf, off + 4)[0]
        nh = buf[off + 6]
        src = buf[off + 8 : off + 24]
        dst = buf[off + 24 : off + 40]
        l4 = off + 40
        end = l4 + plen if plen else n  # 0: jumbogram or GSO
        for _ in range(_MAX_IPV6_EXT):
            if nh not in _IPV6_EXT:
                break
            if n < l4 + 8:
                return None
            if nh == _IPV6_FRAGMENT:
                if _U16.unpack_from(buf, l4 + 2)[0] & 0xFFF8:
                    return None
                ext_len = 8
            elif nh == _IPV6_AH:
                ext_len = (buf[l4 + 1] + 2) * 4
            else:
                ext_len = (buf[l4 + 1] + 1) * 8
            nh = buf[l4]
            l4 += ext_len
        if nh != _IPPROTO_TCP:
            return None
    else:
        return None

    if n < l4 + 20:
        return None
    sport, dport = _PORTS.unpack_from(buf, l4)
    doff = (buf[l4 + 12] >> 4) * 4
    if doff < 20:
        return None
    flags = buf[l4 + 13]
    p = l4 + doff
    payload_len = end - p if end > p else 0
    avail = min(end, n)

    if (src, sport) <= (dst, dport):
        flow = FlowKey(src, sport, dst, dport)
        from_a = True
    else:
        flow = FlowKey(dst, dport, src, sport)
        from_a = False

    kind, client_random = _payload_kind(buf, p, avail, payload_len)
    return WireInfo(flow, kind, client_random, payload_len, flags, from_a, l4)


def _payload_kind(buf: bytes, p: int, avail: int, payload_len: int) -> tuple[Kind, bytes | None]:
    """Look at the TLS record header (and handshake type) at buf[p:avail]."""
    if payload_len == 0:
        return Kind.EMPTY, None
    if avail - p < 5:
        return Kind.PLAIN, None
    ct = buf[p]
    if not _CT_CHANGE_CIPHER_SPEC <= ct <= _CT_HEARTBEAT or buf[p + 1] != 3 or buf[p + 2] > 4:
        return Kind.PLAIN, None
    record_len = _U16.unpack_from(buf, p + 3)[0]
    if record_len == 0 or record_len > MAX_RECORD_LEN:
        return Kind.PLAIN, None
    if ct == _CT_HANDSHAKE:
        if avail - p < 6:
            return Kind.OTHER_TLS, None
        hs_type = buf[p + 5]
        if hs_type == _HS_CLIENT_HELLO:
            if avail - p >= 10 and buf[p + 9] != 3:
                return Kind.OTHER_TLS, None  # legacy_version must be 3.x
            if avail - p < _RANDOM_OFF + _RANDOM_LEN:
                return Kind.CLIENT_HELLO, None  # snapped too short to see the random
            return Kind.CLIENT_HELLO, bytes(buf[p + _RANDOM_OFF : p + _RANDOM_OFF + _RANDOM_LEN])
        if hs_type == _HS_SERVER_HELLO:
            return Kind.SERVER_HELLO, None
        return Kind.OTHER_TLS, None
    if ct == _CT_APPLICATION_DATA:
        return Kind.APPLICATION_DATA, None
    if ct == _CT_CHANGE_CIPHER_SPEC:
        return Kind.CHANGE_CIPHER_SPEC, None
    return Kind.OTHER_TLS, None  # alert or heartbeat
