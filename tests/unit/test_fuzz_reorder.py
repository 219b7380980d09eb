"""Issue 14: the reorder path's parsers (tlswire, tlsstream, reorder and the proof behind it)
never raise on what the wire may carry: ClientHellos split across segments, truncated and
lying records, garbage on port 443, VLAN tags, IPv6 extension headers, segments lost,
repeated or reordered. Property-based (hypothesis, a bounded and derandomized number of
examples, so CI runs the same cases every time): structured connections, then mutated, with
keys for their client randoms so that the proof runs on the garbage too. Each example draws
its choices from a hypothesis-controlled Random, which hypothesis shrinks on a failure."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from keytap.events import Direction, KeyEvent, PacketEvent
from keytap.merge.reorder import ReorderBuffer, ReorderConfig
from keytap.merge.tlsstream import ConnectionRecords
from keytap.merge.tlswire import Kind, classify, tcp_segment
from keytap.tls.selfcheck import SelfCheck
from tests.unit.test_tlsstream import CLIENT_RECORDS, SERVER_RECORDS, frame, segments, wire

CONNECTIONS = 4  # per example
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None)
MS = 1_000_000
LABELS = ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
          "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0")


def vlan(tagged: bytes, rng: random.Random) -> bytes:
    """One or two 802.1Q tags after the MAC addresses."""
    tags = b"".join(b"\x81\x00" + struct.pack("!H", rng.randrange(4096))
                    for _ in range(rng.randint(1, 2)))
    return tagged[:12] + tags + tagged[12:]


def connection(rng: random.Random) -> list[bytes]:
    """One TLS exchange cut at random points, with random sequence numbers."""
    v6 = rng.random() < 0.5
    cseq, sseq = rng.randrange(1 << 32), rng.randrange(1 << 32)
    client, server = bytearray(wire(CLIENT_RECORDS)), wire(SERVER_RECORDS)
    client[11:43] = rng.randbytes(32)  # a session of its own: record, handshake headers, version
    cuts = lambda data: sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))  # noqa: E731
    frames = [frame(p, q, v6=v6) for q, p in segments(client, cseq, cuts(client))]
    frames += [frame(p, q, server=True, v6=v6) for q, p in segments(server, sseq, cuts(server))]
    rng.shuffle(frames[1:])  # the first piece of the ClientHello leads; the rest in any order
    if rng.random() < 0.3:
        frames = [vlan(f, rng) for f in frames]
    return frames


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    op = rng.randrange(6)
    if op == 0 and out:  # truncated (snapped, or a lying length)
        del out[rng.randrange(len(out)):]
    elif op == 1 and out:  # flipped bytes, headers included
        for _ in range(rng.randint(1, 6)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif op == 2:  # garbage after the headers: on port 443, but not TLS
        out[54:] = rng.randbytes(rng.randrange(1, 600))
    elif op == 3 and len(out) > 60:  # a record length that lies
        at = rng.randrange(54, len(out) - 2)
        out[at:at + 2] = struct.pack("!H", rng.choice((0, 1, 0x3FFF, 0xFFFF)))
    elif op == 4:
        out = bytearray(rng.randbytes(rng.randrange(0, 120)))
    return bytes(out)  # op 5: unchanged


def keys_for(frames: list[bytes], t_ns: int, rng: random.Random) -> list[KeyEvent]:
    """Keys (random secrets) for every client random the frames carry: the proof runs."""
    events = []
    for data in frames:
        info = classify(data)
        if info is not None and info.kind is Kind.CLIENT_HELLO and info.client_random:
            lines = tuple(f"{label} {info.client_random.hex()} {rng.randbytes(32).hex()}"
                          for label in LABELS)
            events.append(KeyEvent(t_ns, info.client_random, lines, slot=rng.randrange(2),
                                   server=rng.random() < 0.5))
    return events


def feed(buffer: ReorderBuffer, rng: random.Random, connections: int, t_ns: int = 0) -> int:
    """`connections` mutated exchanges (and their keys) through `buffer`; the time reached."""
    for _ in range(connections):
        frames = connection(rng)
        frames = [mutate(f, rng) if rng.random() < 0.3 else f for f in frames]
        frames += [f for f in frames if rng.random() < 0.1]  # retransmissions
        for data in frames:
            t_ns += rng.randrange(MS)
            buffer.push_packet(PacketEvent(t_ns, 2, Direction.INBOUND, max(len(data), 1),
                                           data))
            assert tcp_segment(data) is None or tcp_segment(data).payload is not None
        for event in keys_for(frames, t_ns, rng):
            buffer.push_keys(event)
        buffer.pop_ready(t_ns)
    buffer.drain()
    return t_ns


def new_buffer() -> ReorderBuffer:
    check = SelfCheck()
    check.add(0, build="one build")
    check.add(1, build="another", proven=("1.3",))
    return ReorderBuffer(ReorderConfig(key_wait_ns=40 * MS), judge=check)


@FUZZ
@given(st.randoms(use_true_random=False))
def test_the_reorder_path_never_raises(rng: random.Random) -> None:
    buffer = new_buffer()
    feed(buffer, rng, CONNECTIONS)
    assert buffer.stats.packets_out == buffer.stats.packets_in  # every packet leaves


def test_the_mutations_leave_enough_tls_for_the_proof_to_run() -> None:
    """The premise of the property: mutated traffic still reaches the TLS paths."""
    buffer = new_buffer()
    feed(buffer, random.Random(0), 60)
    assert buffer.stats.tls_sessions_seen > 20 and buffer.stats.keys_in > 20


@FUZZ
@given(st.randoms(use_true_random=False), st.sampled_from((512, 4096, 64 * 1024)))
def test_connection_records_never_raise(rng: random.Random, record_bytes: int) -> None:
    for _ in range(CONNECTIONS):
        frames = [mutate(f, rng) if rng.random() < 0.5 else f for f in connection(rng)]
        try:
            records = ConnectionRecords(frames[0], record_bytes)
        except ValueError:
            continue  # the first frame is no TCP segment: documented
        for data in frames[1:]:
            records.add(data)
        assert isinstance(records.client_records, list) and isinstance(records.done, bool)
