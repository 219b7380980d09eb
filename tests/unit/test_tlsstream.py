"""tlsstream: the first TLS records per direction from frames in any order; tlswire.tcp_segment.

Frames are built by hand (fast, and full control over sequence numbers, lengths and snapping);
one test checks `tcp_segment` against scapy's dissection of scapy-built frames.
"""

from __future__ import annotations

import itertools
import random
import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from keytap.merge.tlsstream import ConnectionRecords
from keytap.merge.tlswire import (
    MAX_RECORD_LEN,
    TcpSegment,
    classify,
    tcp_segment,
)
from keytap.tls.records import TlsRecord
from tests.support.rfc8448 import RFC8448_CLIENT_HELLO, RFC8448_SERVER_HELLO

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
MSS = 1448

CLIENT4, SERVER4 = bytes([10, 244, 1, 7]), bytes([10, 96, 0, 10])
CLIENT6 = bytes.fromhex("fd000000000000000000000000000007")
SERVER6 = bytes.fromhex("fd00000000000000000000000000000a")
CPORT, SPORT = 51000, 443
# HelloRetryRequest: a ServerHello whose random is SHA-256("HelloRetryRequest").
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
HRR = RFC8448_SERVER_HELLO[:6] + HRR_RANDOM + RFC8448_SERVER_HELLO[38:]


def rec(content_type: int, body: bytes, version: int = 0x0303) -> TlsRecord:
    return TlsRecord(content_type, version, body)


def wire(records: list[TlsRecord]) -> bytes:
    return b"".join(
        struct.pack("!BHH", r.content_type, r.version, len(r.fragment)) + r.fragment
        for r in records
    )


def opaque(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


CLIENT_RECORDS = [
    rec(22, RFC8448_CLIENT_HELLO, 0x0301),
    rec(20, b"\x01"),
    rec(23, opaque(53, 1)),  # Finished
    rec(23, opaque(700, 2)),  # first application data
]
SERVER_RECORDS = [
    rec(22, RFC8448_SERVER_HELLO),
    rec(20, b"\x01"),
    rec(23, opaque(3000, 3)),  # EncryptedExtensions .. CertificateVerify in one record
    rec(23, opaque(69, 4)),  # Finished
    rec(23, opaque(250, 5)),  # NewSessionTicket
    rec(23, opaque(5000, 6)),  # first application data
]


def frame(
    payload: bytes,
    seq: int,
    *,
    server: bool = False,
    flags: int = PSH | ACK,
    v6: bool = False,
    snap: int | None = None,
    sport: int | None = None,
) -> bytes:
    """Ethernet + IPv4/IPv6 (with a destination-options header) + TCP; `snap` cuts the payload."""
    src, dst = (SERVER6, CLIENT6) if v6 else (SERVER4, CLIENT4)
    ports = (SPORT, CPORT) if server else (sport or CPORT, SPORT)
    if not server:
        src, dst = dst, src
    tcp = struct.pack("!HHIIBBHHH", *ports, seq & 0xFFFFFFFF, 0, 5 << 4, flags, 65535, 0, 0)
    if v6:
        ext = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # next header TCP, PadN
        plen = len(ext) + len(tcp) + len(payload)
        ip = struct.pack("!IHBB", 6 << 28, plen if plen <= 0xFFFF else 0, 60, 64) + src + dst
        head = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x86\xdd" + ip + ext + tcp
    else:
        total = 20 + len(tcp) + len(payload)
        total = total if total <= 0xFFFF else 0  # GSO super-packet beyond 64 KiB
        ip = struct.pack("!BBHHHBBH", 0x45, 0, total, 0, 0x4000, 64, 6, 0) + src + dst
        head = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip + tcp
    return head + (payload if snap is None else payload[:snap])


def segments(stream: bytes, seq: int, cuts: list[int] | None = None, mss: int = MSS):
    """(seq, payload) pieces of a stream, cut at `cuts` or every `mss` bytes."""
    points = sorted(set(cuts)) if cuts is not None else list(range(mss, len(stream), mss))
    bounds = [0, *[c for c in points if 0 < c < len(stream)], len(stream)]
    return [((seq + a) & 0xFFFFFFFF, stream[a:b]) for a, b in itertools.pairwise(bounds)]


def flight_frames(cseq: int, sseq: int, *, v6: bool = False, mss: int = MSS) -> list[bytes]:
    """The whole exchange, in order: ClientHello, server flight, client Finished + data."""
    c = wire(CLIENT_RECORDS)
    s = wire(SERVER_RECORDS)
    ch_len = len(wire(CLIENT_RECORDS[:1]))
    out = [frame(c[:ch_len], cseq, v6=v6)]
    out += [frame(p, q, server=True, v6=v6) for q, p in segments(s, sseq, mss=mss)]
    out += [frame(p, q, v6=v6) for q, p in segments(c[ch_len:], cseq + ch_len, mss=mss)]
    return out


def collect(frames: list[bytes], limit: int = 64 * 1024) -> ConnectionRecords:
    conn = ConnectionRecords(frames[0], limit)
    for f in frames[1:]:
        conn.add(f)
    return conn


@pytest.mark.parametrize("v6", [False, True])
def test_in_order(v6: bool) -> None:
    conn = collect(flight_frames(1000, 5000, v6=v6))
    assert conn.client_records == CLIENT_RECORDS
    assert conn.server_records == SERVER_RECORDS
    assert conn.client.contiguous == len(wire(CLIENT_RECORDS))
    assert conn.client.buffered == conn.server.buffered == 0
    assert not conn.done  # no FIN, limit not reached: more may come


def test_records_grow_as_segments_arrive() -> None:
    frames = flight_frames(1000, 5000)
    conn = ConnectionRecords(frames[0])
    assert conn.client_records == CLIENT_RECORDS[:1]
    assert conn.server_records == [] and not conn.server.started
    assert conn.add(frames[1])  # SH + CCS + part of the 3000-byte record
    assert conn.server_records == SERVER_RECORDS[:2]
    assert not conn.add(frames[2])  # still inside the 3000-byte record
    assert conn.add(frames[3])  # completes it, the Finished, the ticket
    assert conn.server_records == SERVER_RECORDS[:5]


def test_out_of_order_server_segments_before_server_hello() -> None:
    frames = flight_frames(1000, 5000)
    ch, server, client = frames[0], frames[1:-1], frames[-1:]
    conn = ConnectionRecords(ch)
    s_end = 5000 + len(wire(SERVER_RECORDS))
    conn.add(frame(b"", s_end, server=True, flags=FIN | ACK))  # even the FIN comes first
    for f in reversed(server[1:]):
        conn.add(f)
        assert not conn.server.finished(False)  # closed, but data waits for its start
    conn.add(server[0])  # the ServerHello segment comes last
    for f in client:
        conn.add(f)
    assert conn.server_records == SERVER_RECORDS
    assert conn.client_records == CLIENT_RECORDS
    assert conn.server.finished(False) and not conn.done  # the client has not closed


def test_garbage_that_came_before_the_server_hello_breaks_the_stream_quietly() -> None:
    """Bytes at the stream's start that are not TLS wait (the start is not known yet); when a
    shorter segment that starts like a ServerHello makes them place, the stream is broken (not
    TLS) and stays so: nothing is parsed from the emptied buffer. It raised IndexError."""
    frames = flight_frames(1000, 5000)
    conn = ConnectionRecords(frames[0])
    conn.add(frame(bytes(range(60, 120)), 5000, server=True))  # where the ServerHello goes
    conn.add(frame(wire(SERVER_RECORDS)[:6], 5000, server=True))  # its first bytes, again
    assert conn.server.broken and conn.server_records == []
    for f in frames[1:]:
        conn.add(f)
    assert conn.server.broken and conn.server_records == []
    assert conn.client_records == CLIENT_RECORDS


def test_shuffled_recut_retransmitted_and_wrapped() -> None:
    """Random cuts, order, duplicates and overlapping retransmissions, ISNs near the wrap."""
    c, s = wire(CLIENT_RECORDS), wire(SERVER_RECORDS)
    ch_len = len(wire(CLIENT_RECORDS[:1]))
    for seed in range(150):
        rng = random.Random(seed)
        cseq = rng.choice([0xFFFFFFFF - rng.randrange(3000), rng.randrange(2**32)])
        sseq = rng.choice([0xFFFFFFFF - rng.randrange(9000), rng.randrange(2**32)])
        pieces: list[bytes] = []
        for stream, seq, server, first in ((c, cseq, False, ch_len), (s, sseq, True, None)):
            body_cuts = [rng.randrange(1, len(stream)) for _ in range(rng.randrange(1, 12))]
            cuts = body_cuts if first is None else [first, *[x for x in body_cuts if x > first]]
            segs = segments(stream, seq, cuts)
            # Retransmissions re-cut differently: overlapping, sometimes spanning old cuts.
            for _ in range(rng.randrange(4)):
                a = rng.randrange(len(stream))
                b = min(len(stream), a + rng.randrange(1, 4000))
                if not server and a < ch_len:
                    a = 0
                segs.append(((seq + a) & 0xFFFFFFFF, stream[a:b]))
            pieces += [frame(p, q, server=server) for q, p in segs]
        ch = pieces.pop(0)  # the ClientHello segment, as the constructor wants it
        rng.shuffle(pieces)
        conn = collect([ch, *pieces])
        assert conn.client_records == CLIENT_RECORDS, seed
        assert conn.server_records == SERVER_RECORDS, seed
        assert conn.client.buffered == conn.server.buffered == 0, seed


def test_data_before_the_stream_is_dropped() -> None:
    """A segment from before the ClientHello (e.g. STARTTLS's plaintext) is not the stream."""
    ch = wire(CLIENT_RECORDS[:1])
    conn = ConnectionRecords(frame(ch, 100_000))
    conn.add(frame(b"STARTTLS\r\n", 100_000 - 10))
    conn.add(frame(b"xx" + ch, 100_000 - 2))  # a retransmission straddling the start
    assert conn.client_records == CLIENT_RECORDS[:1]
    assert not conn.client.pending


def test_gso_segment_carrying_many_records() -> None:
    many = [rec(23, opaque(1000 + i, 100 + i)) for i in range(64)]  # ~65 KiB
    server = [rec(22, RFC8448_SERVER_HELLO), rec(20, b"\x01"), *many]
    s = wire(server)
    assert len(s) > 65535 - 40  # IPv4 tot_len cannot hold it: 0, as GSO/BIG TCP sends it
    conn = ConnectionRecords(frame(wire(CLIENT_RECORDS[:1]), 7), limit_bytes=128 * 1024)
    conn.add(frame(s, 0xFFFF0000, server=True))  # also wraps inside the segment
    assert conn.server_records == server
    conn6 = ConnectionRecords(frame(wire(CLIENT_RECORDS[:1]), 7, v6=True), 128 * 1024)
    conn6.add(frame(s, 9, server=True, v6=True))
    assert conn6.server_records == server


def test_record_spanning_segments() -> None:
    c = wire(CLIENT_RECORDS)
    ch_len = len(wire(CLIENT_RECORDS[:1]))
    # Cut inside the header of the last record, then inside its body.
    last = len(wire(CLIENT_RECORDS[:3]))
    conn = ConnectionRecords(frame(c[:ch_len], 50))
    for q, p in segments(c[ch_len:], 50 + ch_len, [last - ch_len + 2, last - ch_len + 300]):
        conn.add(frame(p, q))
        if q == (50 + ch_len) & 0xFFFFFFFF:
            assert conn.client_records == CLIENT_RECORDS[:3]
    assert conn.client_records == CLIENT_RECORDS


def test_snapped_frame_leaves_a_gap_until_retransmitted() -> None:
    s = wire(SERVER_RECORDS)
    conn = ConnectionRecords(frame(wire(CLIENT_RECORDS), 1))
    segs = segments(s, 77)
    conn.add(frame(segs[0][1], segs[0][0], server=True))
    conn.add(frame(segs[1][1], segs[1][0], server=True, snap=100))  # captured 100 of 1448
    for q, p in segs[2:]:
        conn.add(frame(p, q, server=True))
    assert conn.server_records == SERVER_RECORDS[:2]  # the 3000-byte record has a hole
    assert conn.server.stalled and not conn.server.pending
    # The missing bytes were not invented: nothing of the hole went into a record.
    info = classify(frame(segs[1][1], segs[1][0], server=True, snap=100))
    assert info is not None and info.payload_len == len(segs[1][1])
    conn.add(frame(segs[1][1], segs[1][0], server=True))  # a retransmission fills it
    assert conn.server_records == SERVER_RECORDS
    assert not conn.server.stalled


def test_snapped_gap_then_fin_is_done() -> None:
    s = wire(SERVER_RECORDS)
    c = wire(CLIENT_RECORDS)
    conn = ConnectionRecords(frame(c, 1, flags=PSH | ACK | FIN))
    (q0, p0), (q1, p1), *rest = segments(s, 77)
    conn.add(frame(p0, q0, server=True))
    conn.add(frame(p1, q1, server=True, snap=10))
    assert not conn.done
    for q, p in rest:
        conn.add(frame(p, q, server=True))
    conn.add(frame(b"", 77 + len(s), server=True, flags=FIN | ACK))
    assert conn.done  # the gap is permanent: the bytes were on the wire, only cut off


def test_hello_retry_request() -> None:
    """Two ClientHellos; the server's stream starts at the HelloRetryRequest."""
    ch1 = rec(22, RFC8448_CLIENT_HELLO, 0x0301)
    ch2 = rec(22, RFC8448_CLIENT_HELLO[:-4] + b"\x00\x1c\x00\x02", 0x0303)
    client = [ch1, rec(20, b"\x01"), ch2, rec(23, opaque(53, 7)), rec(23, opaque(90, 8))]
    server = [rec(22, HRR), rec(20, b"\x01"), *SERVER_RECORDS[:1], *SERVER_RECORDS[2:]]
    c, s = wire(client), wire(server)
    n1, n2, n3 = (len(wire(client[:i])) for i in (1, 3, 4))
    h1 = len(wire(server[:2]))
    conn = ConnectionRecords(frame(c[:n1], 9000))
    conn.add(frame(s[:h1], 4000, server=True))  # HRR + CCS
    conn.add(frame(c[n1:n2], 9000 + n1))  # CCS + ClientHello 2
    flight2 = segments(s[h1:], 4000 + h1)
    for q, p in reversed(flight2):  # the second ServerHello's flight, out of order
        conn.add(frame(p, q, server=True))
    conn.add(frame(c[n3:], 9000 + n3))  # application data before Finished: a gap
    assert conn.client_records == client[:3]
    conn.add(frame(c[n2:n3], 9000 + n2))
    assert conn.client_records == client
    assert conn.server_records == server
    assert conn.server_records[0].fragment[6:38] == HRR_RANDOM


def test_server_hello_in_a_fast_open_syn() -> None:
    """TCP Fast Open: the ClientHello rides the SYN, whose sequence number is one before it."""
    c = wire(CLIENT_RECORDS)
    ch_len = len(wire(CLIENT_RECORDS[:1]))
    conn = ConnectionRecords(frame(c[:ch_len], 41, flags=SYN))
    conn.add(frame(c[ch_len:], 42 + ch_len))
    assert conn.client_records == CLIENT_RECORDS


def test_limit_bounds_memory_and_ends_the_direction() -> None:
    limit = 2000
    client = [rec(22, RFC8448_CLIENT_HELLO, 0x0301), *[rec(23, opaque(600, i)) for i in range(8)]]
    c = wire(client)
    ch_len = len(wire(client[:1]))
    conn = ConnectionRecords(frame(c[:ch_len], 3), limit)
    # Far beyond the limit plus one largest record: never kept.
    conn.add(frame(b"\x17" * 5000, 3 + limit + 5 + MAX_RECORD_LEN))
    assert conn.client.buffered == 0
    # Out of order beyond the limit, but possibly the crossing record: kept for now.
    tail = segments(c[ch_len:], 3 + ch_len, mss=500)
    for q, p in reversed(tail):
        conn.add(frame(p, q))
        assert conn.client.buffered <= limit + 5 + MAX_RECORD_LEN
    # The records up to and including the one that crosses the limit, nothing after.
    crossing = next(i for i in range(len(client)) if len(wire(client[: i + 1])) > limit)
    assert conn.client_records == client[: crossing + 1]
    assert conn.client.complete and conn.client.buffered == 0
    assert not conn.done
    s = wire([rec(22, RFC8448_SERVER_HELLO), *[rec(23, opaque(700, 50 + i)) for i in range(6)]])
    for q, p in segments(s, 11, mss=900):
        conn.add(frame(p, q, server=True))
    assert conn.done and conn.server.complete
    assert sum(len(r.fragment) + 5 for r in conn.server_records) < limit + 5 + 700


def test_limit_holds_the_crossing_record_only() -> None:
    """Once the crossing record's header is known, bytes after it are let go."""
    limit = 1000
    big = rec(23, opaque(3000, 9))
    client = [rec(22, RFC8448_CLIENT_HELLO, 0x0301), rec(23, opaque(600, 8)), big, big]
    c = wire(client)
    ch_len = len(wire(client[:1]))
    conn = ConnectionRecords(frame(c[:ch_len], 3), limit)
    after = len(wire(client[:3]))
    conn.add(frame(c[after:], 3 + after))  # the record after the crossing one
    held = conn.client.buffered
    assert held == len(c) - ch_len  # the buffer runs from the first unparsed byte
    conn.add(frame(c[ch_len : ch_len + 700], 3 + ch_len))  # 2nd record + crossing header
    assert conn.client.buffered < held  # the record after the crossing one is gone
    conn.add(frame(c[ch_len + 700 : after], 3 + ch_len + 700))
    assert conn.client_records == client[:3] and conn.client.complete


def test_done_after_fin_or_rst_with_nothing_pending() -> None:
    frames = flight_frames(1000, 5000)
    c, s = wire(CLIENT_RECORDS), wire(SERVER_RECORDS)
    conn = collect(frames)
    conn.add(frame(b"", 1000 + len(c), flags=FIN | ACK))
    assert not conn.done  # the server has not closed
    conn.add(frame(b"", 5000 + len(s), server=True, flags=FIN | ACK))
    assert conn.done
    # A FIN before a segment that has not come: not done until it comes.
    gap = collect([f for i, f in enumerate(frames) if i != 2])
    gap.add(frame(b"", 1000 + len(c), flags=FIN | ACK))
    gap.add(frame(b"", 5000 + len(s), server=True, flags=FIN | ACK))
    assert not gap.done and gap.server.pending
    gap.add(frames[2])
    assert gap.done
    # RST: done unless something is pending.
    rst = collect(frames[:3])
    rst.add(frame(b"", 1000 + len(c), flags=RST))
    assert rst.done
    rst_gap = collect([frames[0], frames[1], frames[3]])
    rst_gap.add(frame(b"", 1000 + len(c), flags=RST))
    assert not rst_gap.done
    # The server closes without ever sending a ServerHello.
    refused = ConnectionRecords(frames[0])
    refused.add(frame(b"", 5000, server=True, flags=FIN | ACK))
    refused.add(frame(b"", 1000 + len(wire(CLIENT_RECORDS[:1])), flags=FIN | ACK))
    assert refused.done and refused.server_records == []


def test_not_tls_stops_parsing() -> None:
    ch = wire(CLIENT_RECORDS[:1])
    conn = ConnectionRecords(frame(ch + b"GET / HTTP/1.1\r\n\r\n", 1))
    assert conn.client_records == CLIENT_RECORDS[:1]
    assert conn.client.broken and conn.client.buffered == 0
    conn.add(frame(b"more", 1 + len(ch) + 18))
    assert conn.client.buffered == 0


def test_other_flows_and_non_tcp_are_ignored() -> None:
    frames = flight_frames(1000, 5000)
    conn = ConnectionRecords(frames[0])
    assert not conn.add(frame(wire(SERVER_RECORDS), 5000, sport=CPORT + 1))
    assert not conn.add(frame(wire(SERVER_RECORDS), 5000, v6=True, server=True))
    assert not conn.add(b"\x00" * 30)
    assert conn.server_records == []
    with pytest.raises(ValueError):
        ConnectionRecords(b"\x00" * 60)


def test_accepts_parsed_segments() -> None:
    frames = flight_frames(1000, 5000)
    segs = [tcp_segment(f) for f in frames]
    assert all(isinstance(s, TcpSegment) for s in segs)
    conn = ConnectionRecords(segs[0])  # type: ignore[arg-type]
    for s in segs[1:]:
        conn.add(s)  # type: ignore[arg-type]
    assert conn.server_records == SERVER_RECORDS


def test_garbage_never_raises_and_memory_stays_bounded() -> None:
    rng = random.Random(8446)
    frames = flight_frames(0xFFFFFF00, 5000)
    limit = 4096
    for _ in range(40):
        conn = ConnectionRecords(frames[0], limit)
        for _ in range(150):
            base = bytearray(rng.choice(frames))
            op = rng.randrange(4)
            if op == 0:
                base = base[: rng.randrange(len(base) + 1)]
            elif op == 1:
                for _ in range(rng.randrange(1, 8)):
                    base[rng.randrange(len(base))] = rng.randrange(256)
            elif op == 2:  # garbage payload at a random sequence number, same flow
                seq = rng.randrange(2**32)
                base = bytearray(
                    frame(rng.randbytes(rng.randrange(3000)), seq, server=rng.random() < 0.5)
                )
            else:
                base = bytearray(rng.randbytes(rng.randrange(200)))
            conn.add(bytes(base))
            _ = conn.done, conn.client.stalled, conn.server.pending
            for side in (conn.client, conn.server):
                assert side.buffered <= limit + 5 + MAX_RECORD_LEN
                assert sum(len(r.fragment) + 5 for r in side.records) <= limit + 5 + MAX_RECORD_LEN


def test_tcp_segment_matches_scapy() -> None:
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    payload = wire(CLIENT_RECORDS)
    pkts = [
        eth / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=5, dport=443, seq=2**32 - 1),
        eth
        / Dot1Q(vlan=3)
        / IP(src="10.0.0.2", dst="10.0.0.1", options=b"\x01\x01\x01\x00")
        / TCP(sport=443, dport=5, seq=12345, flags="FA", options=[("MSS", 1460), ("NOP", None)]),
        eth
        / IPv6(src="fd00::2", dst="fd00::1")
        / IPv6ExtHdrDestOpt()
        / TCP(sport=443, dport=5, seq=7, flags="S"),
    ]
    for pkt in pkts:
        raw = bytes(pkt / Raw(payload))
        seg = tcp_segment(raw)
        info = classify(raw)
        assert seg is not None and info is not None
        tcp = (pkt / Raw(payload))[TCP]
        assert (seg.seq, seg.flags) == (tcp.seq, int(tcp.flags))
        assert seg.payload == payload and seg.length == len(payload)
        assert (seg.flow, seg.from_a) == (info.flow, info.from_a)
    snapped = tcp_segment(bytes(pkts[0] / Raw(payload))[:80])
    assert snapped is not None and snapped.length == len(payload) and len(snapped.payload) == 26
    assert tcp_segment(b"") is None and tcp_segment(bytes(60)) is None
