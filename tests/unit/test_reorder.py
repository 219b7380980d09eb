"""reorder: ktime merge, per-flow hold until keys, DSB first, keys only of proven slots.

Frames are real (built with scapy) so that `tlswire.classify` does the recognizing, as in
production. The proof is a stand-in (`wire_prover`: a session's keys verify once its
ClientHello was recorded, unless told otherwise); tls.proof has its own tests. Times are in
milliseconds in the tests and converted to ktime nanoseconds.
"""

from __future__ import annotations

import functools
import gc
import random

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.tls.handshake import TLSClientHello, TLSServerHello
from scapy.layers.tls.record import TLS, TLSApplicationData
from scapy.packet import Raw

from keytap.events import Direction, KeyEvent, PacketEvent
from keytap.merge.reorder import Event, ReorderBuffer, ReorderConfig
from keytap.merge.tlswire import FlowKey, classify
from keytap.tls.proof import SessionProof, Verdict
from keytap.tls.selfcheck import SelfCheck, SlotState

MS = 1_000_000
WINDOW_MS = 50
KEY_WAIT_MS = 1500
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
CLIENT, SERVER, WEB = "10.244.1.7", "10.96.0.10", "10.96.0.80"

RANDOM_A = bytes(range(32))
RANDOM_B = bytes(range(100, 132))


@functools.cache  # scapy takes about a millisecond per frame; the tests reuse frames a lot
def tcp_frame(
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    reply: bool = False,
    dst: str = SERVER,
    flags: str = "PA",
) -> bytes:
    if reply:
        pkt = ETH / IP(src=dst, dst=CLIENT) / TCP(sport=dport, dport=sport, flags=flags)
    else:
        pkt = ETH / IP(src=CLIENT, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)
    return bytes(pkt / Raw(payload)) if payload else bytes(pkt)


@functools.cache
def client_hello(rnd: bytes) -> bytes:
    hello = TLSClientHello(
        gmt_unix_time=int.from_bytes(rnd[:4], "big"), random_bytes=rnd[4:], ciphers=[0x1301]
    )
    return bytes(TLS(msg=[hello]))


SERVER_HELLO = bytes(TLS(msg=[TLSServerHello()]))
APP_DATA = bytes(TLS(type=23, msg=[TLSApplicationData(data=b"\x42" * 64)]))


class Flow:
    """A TCP connection from CLIENT: frames for its ClientHello, replies and data."""

    def __init__(
        self, sport: int, rnd: bytes | None = None, dport: int = 443, dst: str = SERVER
    ) -> None:
        self.sport, self.dport, self.dst, self.random = sport, dport, dst, rnd

    def hello(self) -> bytes:
        assert self.random is not None
        return tcp_frame(self.sport, self.dport, client_hello(self.random), dst=self.dst)

    def server_hello(self) -> bytes:
        return tcp_frame(self.sport, self.dport, SERVER_HELLO, reply=True, dst=self.dst)

    def data(self, reply: bool = False) -> bytes:
        payload = APP_DATA if self.random else b"GET / HTTP/1.1\r\n\r\n"
        return tcp_frame(self.sport, self.dport, payload, reply=reply, dst=self.dst)

    @property
    def key(self) -> FlowKey:
        info = classify(self.data())
        assert info is not None
        return info.flow


TLS_A = Flow(40001, RANDOM_A)
TLS_B = Flow(40002, RANDOM_B)
PLAIN = Flow(50000, None, dport=80, dst=WEB)
UDP_FRAME = bytes(ETH / IP(src=CLIENT, dst=WEB) / UDP(sport=5353, dport=53) / Raw(b"q"))


def pkt(t_ms: float, data: bytes, ifindex: int = 2) -> PacketEvent:
    return PacketEvent(
        ktime_ns=int(t_ms * MS),
        ifindex=ifindex,
        direction=Direction.OUTBOUND,
        orig_len=len(data),
        data=data,
    )


SLOT = 0  # the layout slot of the tests' keys
TLS13_LABELS = ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0")
REFUTED = "cd" * 32  # a secret the stand-in proof finds wrong
LATER = "ee" * 32  # ... can check only once the server has sent a record
NEVER = "dd" * 32  # ... can never check (no record was sent under it)


def keys(t_ms: float, rnd: bytes, *labels: str, slot: int = SLOT, secret: str = "ab" * 32,
         server: bool = False) -> KeyEvent:
    labels = labels or TLS13_LABELS
    lines = tuple(f"{label} {rnd.hex()} {secret}" for label in labels)
    return KeyEvent(ktime_ns=int(t_ms * MS), client_random=rnd, lines=lines, slot=slot,
                    server=server)


def wire_prover(client, server, lines, _memo) -> SessionProof:
    """Verified once the ClientHello is recorded, failed for REFUTED secrets, and unchecked
    for LATER secrets until the server has sent a record."""
    verdicts = {}
    for line in lines:
        label, _, secret = line.split()
        if not client:
            verdicts[label] = Verdict.UNCHECKED
        elif secret == REFUTED:
            verdicts[label] = Verdict.FAILED
        elif secret == NEVER or (secret == LATER and not server):
            verdicts[label] = Verdict.UNCHECKED
        else:
            verdicts[label] = Verdict.VERIFIED
    return SessionProof(verdicts)


def buffer(check: SelfCheck | None = None, **kw: int) -> ReorderBuffer:
    kw.setdefault("check_every_ns", 0)  # every pop (the batches have a test of their own)
    config = ReorderConfig(window_ns=WINDOW_MS * MS, key_wait_ns=KEY_WAIT_MS * MS, **kw)
    if check is None:
        check = slots(SLOT)
    return ReorderBuffer(config, judge=check, prover=wire_prover)


def slots(*numbers: int) -> SelfCheck:
    """A self-check with these slots, each a candidate of a build of its own."""
    check = SelfCheck()
    for number in numbers:
        check.add(number, build=f"build {number}")
    return check


def pop(buf: ReorderBuffer, now_ms: float) -> list[Event]:
    return buf.pop_ready(int(now_ms * MS))


def times(events: list[Event]) -> list[float | str]:
    """ktime in ms of packets; keys shown as 'K'."""
    return [e.ktime_ns / MS if isinstance(e, PacketEvent) else "K" for e in events]


def assert_monotonic_per_interface(events: list[Event]) -> None:
    last: dict[int, int] = {}
    for e in events:
        if isinstance(e, PacketEvent):
            assert e.ktime_ns >= last.get(e.ifindex, 0), f"time went back on if {e.ifindex}"
            last[e.ifindex] = e.ktime_ns


def assert_keys_before_flow(events: list[Event], rnd: bytes, flow: Flow) -> None:
    """The session's first KeyEvent precedes every packet of its flow."""
    key_at = next(
        i for i, e in enumerate(events) if isinstance(e, KeyEvent) and e.client_random == rnd
    )
    first_packet = next(i for i, e in enumerate(events) if _flow_of(e) == flow.key)
    assert key_at < first_packet


def _flow_of(e: Event) -> FlowKey | None:
    info = classify(e.data) if isinstance(e, PacketEvent) else None
    return info.flow if info else None


# the proof, session by session --------------------------------------------------------------


def test_refuted_keys_are_dropped_and_reject_a_candidate() -> None:
    check = slots(SLOT)
    buf = buffer(check)
    buf.push_packet(pkt(10, TLS_A.hello()))
    buf.push_keys(keys(12, RANDOM_A, secret=REFUTED))
    out = pop(buf, 10 + KEY_WAIT_MS) + buf.drain()
    assert times(out) == [10]  # no DSB, the flow let go without keys
    assert buf.stats.keys_failed == 1 and check.state(SLOT, "1.3") is SlotState.REJECTED
    buf.push_keys(keys(2000, RANDOM_B))  # a rejected slot's later keys are not even held
    assert buf.stats.keys_rejected == 1 and buf.drain() == []
    assert buf.stats.verification == {"TLS 1.3 client": {"failed": 1}}


def test_a_proven_slot_still_checks_each_session() -> None:
    check = slots(SLOT)
    buf = buffer(check)
    prove_slot(buf, check)
    buf.push_packet(pkt(20, TLS_B.hello()))
    buf.push_keys(keys(21, RANDOM_B, secret=LATER, server=True))
    assert times(pop(buf, 21)) == ["K"]  # proven slot: written at once, checked as records come
    assert check.slots[SLOT].verified == 1
    buf.push_packet(pkt(22, TLS_B.server_hello()))
    pop(buf, 24)
    assert check.slots[SLOT].verified == 1  # checked once its records are complete
    buf.drain()
    assert check.slots[SLOT].verified == 2
    assert buf.stats.verification == {"TLS 1.3 client": {"verified": 1},
                                      "TLS 1.3 server": {"verified": 1}}


def test_the_other_end_of_a_verified_session_is_verified_by_the_same_secrets() -> None:
    """Client and server both probed (loopback, two pods of one node): the second event comes
    once the first one's proof let the records go. The same secrets are verified; others are
    not, as their records are gone."""
    check = slots(SLOT, SLOT + 1, SLOT + 2)
    buf = buffer(check)
    buf.push_packet(pkt(10, TLS_A.hello()))
    buf.push_packet(pkt(11, TLS_A.server_hello()))
    buf.push_keys(keys(12, RANDOM_A, server=True))
    assert times(pop(buf, 12)) == ["K"]
    buf.push_keys(keys(13, RANDOM_A, slot=SLOT + 1))
    buf.push_keys(keys(14, RANDOM_A, slot=SLOT + 2, secret=LATER))
    out = pop(buf, 14 + KEY_WAIT_MS) + buf.drain()
    assert times(out) == [10, 11]  # nothing new to write
    assert buf.stats.verification == {"TLS 1.3 server": {"verified": 1},
                                      "TLS 1.3 client": {"verified": 1, "unchecked": 1}}
    assert check.slots[SLOT + 1].verified == 1 and check.slots[SLOT + 2].verified == 0


def test_a_proven_slot_does_not_write_keys_its_session_refutes() -> None:
    check = slots(SLOT)
    buf = buffer(check)
    prove_slot(buf, check)
    buf.push_packet(pkt(20, TLS_B.hello()))
    buf.push_keys(keys(21, RANDOM_B, secret=REFUTED))
    assert times(pop(buf, 100)) == [0]  # A's hello only; B is held without keys
    assert buf.stats.keys_failed == 1 and check.slots[SLOT].protocols["1.3"].failed == 1
    assert check.state(SLOT) is SlotState.PROVEN  # one failure does not undo a proof


def proven(check: SelfCheck | None = None) -> tuple[SelfCheck, ReorderBuffer]:
    """A buffer whose slot was proven by session A."""
    check = check or slots(SLOT)
    buf = buffer(check)
    prove_slot(buf, check)
    return check, buf


def test_a_proven_slots_keys_are_written_once_their_records_verify_them() -> None:
    check, buf = proven()
    buf.push_packet(pkt(20, TLS_B.hello()))
    buf.push_keys(keys(21, RANDOM_B))
    assert times(pop(buf, 21)) == ["K"]  # checked as they came: B's flow is not held
    assert times(pop(buf, 80)) == [0, 20]
    assert check.slots[SLOT].verified == 2 and buf.stats.proofs_run == 2


def test_keys_their_records_refute_are_never_written_though_the_slot_is_proven() -> None:
    check, buf = proven()
    buf.push_packet(pkt(20, TLS_B.hello()))
    buf.push_keys(keys(21, RANDOM_B, secret=REFUTED))
    out = pop(buf, 80) + pop(buf, 20 + KEY_WAIT_MS) + buf.drain()
    assert times(out) == [0, 20]  # B let go without keys
    assert buf.stats.keys_failed == 1 and check.slots[SLOT].protocols["1.3"].failed == 1
    assert check.state(SLOT) is SlotState.PROVEN


def test_keys_without_records_yet_are_written_and_checked_when_their_records_are_complete(
) -> None:
    """No ClientHello recorded when they come: a proven slot's keys are written at once
    (nothing refutes them), and checked once the connection ends."""
    _, buf = proven()
    buf.push_keys(keys(19, RANDOM_B, server=True))
    assert times(pop(buf, 19)) == ["K"]
    buf.push_packet(pkt(20, TLS_B.hello()))
    assert times(pop(buf, 80)) == [0, 20]
    assert buf.stats.verification.get("TLS 1.3 server") is None
    buf.push_packet(pkt(90, tcp_frame(TLS_B.sport, TLS_B.dport, flags="FA")))
    buf.push_packet(pkt(91, tcp_frame(TLS_B.sport, TLS_B.dport, flags="FA", reply=True)))
    pop(buf, 200)
    assert buf.stats.verification["TLS 1.3 server"] == {"verified": 1}


def test_written_keys_their_complete_records_refute_count_as_failed() -> None:
    """Written before their records could decide, refuted once they could: counted failed
    (the capture says so), and the slot is told."""
    check, buf = proven()
    buf.push_keys(keys(19, RANDOM_B, secret=REFUTED, server=True))
    assert times(pop(buf, 19)) == ["K"]
    buf.push_packet(pkt(20, TLS_B.hello()))
    assert times(pop(buf, 80)) == [0, 20]
    buf.drain()
    assert buf.stats.verification["TLS 1.3 server"] == {"failed": 1}
    assert buf.stats.keys_failed == 0  # written: not counted as dropped
    assert check.slots[SLOT].protocols["1.3"].failed == 1


def test_keys_the_end_of_a_capture_leaves_unchecked_count_as_unchecked() -> None:
    _, buf = proven()
    buf.push_packet(pkt(20, TLS_B.hello()))
    buf.push_keys(keys(21, RANDOM_B, secret=LATER, server=True))  # no server record ever
    out = buf.drain()
    assert times(out) == ["K", 0, 20]
    assert buf.stats.verification["TLS 1.3 server"] == {"unchecked": 1}


def test_sessions_are_checked_in_batches_at_most_every_check_every_ns() -> None:
    """Proofs run one after another, on warm caches: keys that come between two batches wait
    for the next one (well within the window their flows' packets wait anyway)."""
    check = slots(SLOT)
    buf = buffer(check, check_every_ns=10 * MS)
    prove_slot(buf, check)  # its check ran at 1 ms
    sessions = [Flow(41000 + i, bytes([i]) * 32) for i in range(3)]
    for i, flow in enumerate(sessions):
        buf.push_packet(pkt(2 + i, flow.hello()))
        buf.push_keys(keys(2.5 + i, flow.random))  # type: ignore[arg-type]
    assert times(pop(buf, 10.9)) == []  # not due: nothing checked, nothing written
    assert buf.stats.proofs_run == 1
    assert times(pop(buf, 11)) == ["K", "K", "K"]  # one batch
    assert buf.stats.proofs_run == 4 and check.slots[SLOT].verified == 4


def test_keys_lacking_a_secret_wireshark_needs_never_prove_a_slot() -> None:
    check = slots(SLOT)
    buf = buffer(check)
    buf.push_packet(pkt(10, TLS_A.hello()))
    buf.push_keys(keys(12, RANDOM_A, "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"))
    assert times(pop(buf, 12 + KEY_WAIT_MS)) == [10]  # verified as far as they go: not enough
    assert check.state(SLOT, "1.3") is SlotState.CANDIDATE
    assert check.slots[SLOT].protocols["1.3"].unproven == 1  # its records were there


def test_a_side_that_closed_without_a_record_under_its_secret_does_not_block_the_proof(
) -> None:
    """A client that sends nothing after its Finished (openssl s_time): its traffic secret
    can never be checked. Once both sides closed, the rest proves the slot; that one line,
    unproven, is left out (nothing would use it)."""
    check = slots(SLOT)
    buf = buffer(check)
    buf.push_packet(pkt(10, TLS_A.hello()))
    buf.push_packet(pkt(11, TLS_A.server_hello()))
    lines = (*keys(12, RANDOM_A, *TLS13_LABELS[:2], "SERVER_TRAFFIC_SECRET_0").lines,
             f"CLIENT_TRAFFIC_SECRET_0 {RANDOM_A.hex()} {NEVER}")
    buf.push_keys(KeyEvent(12 * MS, RANDOM_A, lines, SLOT))
    assert pop(buf, 13) == []  # the client may still send a record
    buf.push_packet(pkt(14, tcp_frame(TLS_A.sport, TLS_A.dport, flags="FA")))
    buf.push_packet(pkt(15, tcp_frame(TLS_A.sport, TLS_A.dport, reply=True, flags="FA")))
    out = pop(buf, 100)
    assert times(out) == ["K", 10, 11, 14, 15]
    assert out[0].lines == lines[:3]  # type: ignore[union-attr]
    assert check.state(SLOT, "1.3") is SlotState.PROVEN


def test_keys_never_proven_are_counted_unchecked() -> None:
    buf = buffer()
    buf.push_packet(pkt(10, TLS_A.hello()))
    buf.push_keys(keys(12, RANDOM_A, secret=LATER))  # the server never answers
    assert times(pop(buf, 12 + KEY_WAIT_MS)) == [10]
    assert buf.stats.keys_unconfirmed == 1
    assert buf.stats.verification == {"TLS 1.3 client": {"unchecked": 1}}


# ordering -----------------------------------------------------------------------------------


def test_merges_cpus_and_interfaces_in_ktime_order() -> None:
    buf = buffer()
    # Three per-CPU rings, each in order, drained one ring after the other.
    rings = [
        [pkt(1, PLAIN.data(), 2), pkt(4, UDP_FRAME, 3), pkt(7, PLAIN.data(reply=True), 2)],
        [pkt(2, UDP_FRAME, 3), pkt(5, PLAIN.data(), 2), pkt(8, UDP_FRAME, 3)],
        [pkt(3, PLAIN.data(), 4), pkt(6, PLAIN.data(), 4), pkt(9, PLAIN.data(), 4)],
    ]
    for ring in rings:
        for ev in ring:
            buf.push_packet(ev)
    assert pop(buf, 50) == []  # nothing is 50 ms old yet
    first = pop(buf, 54)
    assert times(first) == [1, 2, 3, 4]  # ready means now - ktime >= window
    rest = pop(buf, 100)
    assert times(rest) == [5, 6, 7, 8, 9]
    assert buf.stats.packets_in == buf.stats.packets_out == 9
    assert buf.stats.backsteps == 0 and len(buf) == 0


def test_equal_ktime_keeps_push_order() -> None:
    buf = buffer()
    evs = [pkt(10, PLAIN.data(), ifindex=i) for i in (5, 3, 9, 1)]
    for ev in evs:
        buf.push_packet(ev)
    assert pop(buf, 60) == evs


def test_shuffled_input_comes_out_sorted() -> None:
    rng = random.Random(7)
    buf = buffer()
    evs = [
        pkt(rng.randrange(0, 40), rng.choice([PLAIN.data(), UDP_FRAME]), rng.choice([2, 3]))
        for _ in range(300)
    ]
    for ev in evs:
        buf.push_packet(ev)
    out = pop(buf, 1000)
    assert [e.ktime_ns for e in out] == sorted(e.ktime_ns for e in evs)
    assert_monotonic_per_interface(out)


# keys and holds -----------------------------------------------------------------------------


def test_keys_after_client_hello_are_written_first() -> None:
    buf = buffer()
    for ev in (
        pkt(10, TLS_A.hello()),
        pkt(11, PLAIN.data()),
        pkt(12, TLS_A.server_hello()),
        pkt(20, PLAIN.data()),
        pkt(25, TLS_A.data()),
    ):
        buf.push_packet(ev)
    # At 80 ms everything is past the window, but flow A has no keys: only plain traffic goes.
    assert times(pop(buf, 80)) == [11, 20]
    assert buf.stats.packets_held == 3
    buf.push_keys(keys(90, RANDOM_A))
    out = pop(buf, 95)
    assert times(out) == ["K", 10, 12, 25]
    assert out[0].client_random == RANDOM_A  # type: ignore[union-attr]
    s = buf.stats
    assert (s.tls_sessions_seen, s.sessions_with_keys, s.sessions_without_keys) == (1, 1, 0)
    assert s.longest_hold_ns == 85 * MS
    # FLOW policy: true timestamps; the late flow stepped back on interface 2, and it is counted.
    assert s.backsteps == 2 and s.max_backstep_ns == 10 * MS  # 10 and 12 after 20


def test_keys_within_window_reorder_nothing() -> None:
    buf = buffer()
    for ev in (pkt(10, TLS_A.hello()), pkt(11, PLAIN.data()), pkt(12, TLS_A.server_hello())):
        buf.push_packet(ev)
    buf.push_keys(keys(30, RANDOM_A))  # keys came 20 ms after the ClientHello
    out = pop(buf, 100)
    assert times(out) == ["K", 10, 11, 12]
    assert buf.stats.packets_held == 0 and buf.stats.backsteps == 0


def test_keys_before_client_hello_mean_no_hold() -> None:
    buf = buffer()
    buf.push_keys(keys(5, RANDOM_A))
    assert pop(buf, 6) == []  # the slot is not proven yet: the keys wait for the wire
    for ev in (pkt(10, TLS_A.hello()), pkt(12, TLS_A.server_hello()), pkt(13, PLAIN.data())):
        buf.push_packet(ev)
    out = pop(buf, 11)
    assert times(out) == ["K"]  # proven by the pushed ClientHello, written before any window
    out += pop(buf, 70)
    assert times(out) == ["K", 10, 12, 13]
    assert buf.stats.packets_held == 0
    assert buf.stats.sessions_with_keys == 1 and buf.stats.keys_without_client_hello == 0


def test_keys_pushed_with_a_later_ktime_still_precede_the_hello() -> None:
    # Keys read after the hello (server side) but drained from their ring first.
    buf = buffer()
    buf.push_packet(pkt(10, TLS_A.hello()))
    buf.push_keys(keys(10.5, RANDOM_A))
    buf.push_packet(pkt(10.2, PLAIN.data()))
    out = pop(buf, 100)
    assert times(out) == ["K", 10, 10.2]
    assert_keys_before_flow(out, RANDOM_A, TLS_A)


def test_keys_never_arrive_flow_released_after_key_wait() -> None:
    buf = buffer()
    for ev in (pkt(10, TLS_A.hello()), pkt(20, TLS_A.server_hello()), pkt(30, TLS_A.data())):
        buf.push_packet(ev)
    assert pop(buf, 100) == []
    assert pop(buf, 10 + KEY_WAIT_MS - 1) == []
    out = pop(buf, 10 + KEY_WAIT_MS)
    assert times(out) == [10, 20, 30]
    s = buf.stats
    assert (s.tls_sessions_seen, s.sessions_with_keys, s.sessions_without_keys) == (1, 0, 1)
    assert list(s.flows_without_keys) == [TLS_A.key]
    assert s.longest_hold_ns == KEY_WAIT_MS * MS
    # Later packets of the released flow are not held again.
    buf.push_packet(pkt(1600, TLS_A.data()))
    assert times(pop(buf, 1650)) == [1600]
    # Keys that come too late are still written, and counted as such.
    buf.push_keys(keys(1700, RANDOM_A))
    assert times(pop(buf, 1700)) == ["K"]
    assert s.keys_after_release == 1 and s.sessions_with_keys == 0


def test_interleaved_flows_one_gets_keys_one_does_not() -> None:
    buf = buffer()
    for ev in (
        pkt(10, TLS_A.hello()),
        pkt(11, TLS_B.hello()),
        pkt(12, PLAIN.data()),
        pkt(20, TLS_B.server_hello()),
        pkt(21, TLS_A.server_hello()),
        pkt(30, PLAIN.data()),
        pkt(40, TLS_A.data()),
        pkt(41, TLS_B.data()),
    ):
        buf.push_packet(ev)
    assert times(pop(buf, 100)) == [12, 30]
    buf.push_keys(keys(150, RANDOM_A))
    buf.push_packet(pkt(160, TLS_A.data(reply=True)))
    buf.push_packet(pkt(161, TLS_B.data(reply=True)))
    out = pop(buf, 200)
    assert times(out) == ["K", 10, 21, 40]  # A released; B still held, 160 not due yet
    assert times(pop(buf, 211)) == [160]
    assert pop(buf, 11 + KEY_WAIT_MS - 1) == []
    assert times(pop(buf, 11 + KEY_WAIT_MS)) == [11, 20, 41, 161]
    s = buf.stats
    assert (s.tls_sessions_seen, s.sessions_with_keys, s.sessions_without_keys) == (2, 1, 1)
    assert list(s.flows_without_keys) == [TLS_B.key]


def test_whole_flow_is_held_in_both_directions_and_on_all_interfaces() -> None:
    buf = buffer()
    buf.push_packet(pkt(10, TLS_A.hello(), ifindex=2))
    buf.push_packet(pkt(11, TLS_A.hello(), ifindex=3))  # the same hello seen on a second link
    buf.push_packet(pkt(20, TLS_A.server_hello(), ifindex=3))
    buf.push_packet(pkt(21, TLS_A.data(reply=True), ifindex=2))
    assert pop(buf, 100) == []
    buf.push_keys(keys(100, RANDOM_A))
    out = pop(buf, 100)
    assert times(out) == ["K", 10, 11, 20, 21]
    assert buf.stats.tls_sessions_seen == 1


def test_same_random_on_two_flows_waits_together() -> None:
    # E.g. the session seen before and after NAT: two FlowKeys, one client random.
    natted = Flow(61000, RANDOM_A, dst="192.0.2.1")
    buf = buffer()
    buf.push_packet(pkt(10, TLS_A.hello(), ifindex=2))
    buf.push_packet(pkt(10.1, natted.hello(), ifindex=9))
    buf.push_packet(pkt(20, natted.server_hello(), ifindex=9))
    assert pop(buf, 100) == []
    buf.push_keys(keys(100, RANDOM_A))
    out = pop(buf, 100)
    assert times(out) == ["K", 10, 10.1, 20]
    assert (buf.stats.tls_sessions_seen, buf.stats.sessions_with_keys) == (1, 1)


def test_retransmitted_client_hello_is_not_a_new_session() -> None:
    buf = buffer()
    buf.push_packet(pkt(10, TLS_A.hello()))
    buf.push_keys(keys(12, RANDOM_A))
    buf.push_packet(pkt(210, TLS_A.hello()))  # retransmission
    out = pop(buf, 300)
    assert times(out) == ["K", 10, 210]
    assert buf.stats.tls_sessions_seen == 1 and buf.stats.packets_held == 0


def test_non_tls_is_never_delayed_beyond_the_window_while_a_flow_is_held() -> None:
    rng = random.Random(1)
    buf = buffer()
    buf.push_packet(pkt(0, TLS_A.hello()))
    plain = [
        pkt(t, rng.choice([PLAIN.data(), UDP_FRAME]), rng.choice([2, 3])) for t in range(1, 1400, 7)
    ]
    tls = [pkt(t, TLS_A.data(reply=t % 2 == 0)) for t in range(3, 1400, 11)]
    arrivals = sorted(plain + tls, key=lambda e: e.ktime_ns)
    written_at: dict[int, int] = {}
    now = 0
    pending = list(arrivals)
    while now <= 1450:
        while pending and pending[0].ktime_ns <= now * MS:
            buf.push_packet(pending.pop(0))
        for ev in pop(buf, now):
            written_at[id(ev)] = now
        now += 5
    for ev in plain:
        assert written_at[id(ev)] * MS - ev.ktime_ns < (WINDOW_MS + 5) * MS
    assert not any(id(ev) in written_at for ev in tls)  # flow A still waits for its keys
    buf.push_keys(keys(1450, RANDOM_A))
    out = pop(buf, 1450)
    assert out[0].client_random == RANDOM_A  # type: ignore[union-attr]
    assert times(out[1:3]) == [0, 3]


def test_keys_pushed_before_the_deadline_win_over_expiry() -> None:
    buf = buffer()
    buf.push_packet(pkt(10, TLS_A.hello()))
    assert pop(buf, 100) == []
    buf.push_keys(keys(1400, RANDOM_A))
    out = pop(buf, 5000)  # the caller was slow; the keys were here in time
    assert times(out) == ["K", 10]
    assert buf.stats.sessions_with_keys == 1 and buf.stats.sessions_without_keys == 0


def test_hello_already_older_than_key_wait_is_not_held() -> None:
    buf = buffer()
    buf.push_packet(pkt(10, TLS_A.hello()))
    assert times(pop(buf, 10 + KEY_WAIT_MS)) == [10]
    assert buf.stats.sessions_without_keys == 1 and buf.stats.packets_held == 0


def test_held_flow_size_cap_releases_without_keys() -> None:
    buf = buffer(max_held_per_flow=3)
    buf.push_packet(pkt(10, TLS_A.hello()))
    for t in (11, 12, 13):
        buf.push_packet(pkt(t, TLS_A.data()))
    buf.push_packet(pkt(14, PLAIN.data()))
    out = pop(buf, 100)
    assert times(out) == [10, 11, 12, 13, 14]
    assert buf.stats.sessions_without_keys == 1


# keys bookkeeping ---------------------------------------------------------------------------


def test_keys_are_deduplicated() -> None:
    check = slots(SLOT)
    buf = buffer(check)
    prove_slot(buf, check)  # RANDOM_B is then trusted
    buf.push_keys(keys(1, RANDOM_B, "CLIENT_HANDSHAKE_TRAFFIC_SECRET"))
    buf.push_keys(keys(2, RANDOM_B, "CLIENT_HANDSHAKE_TRAFFIC_SECRET"))
    out = pop(buf, 2)
    assert len(out) == 1
    # A later read with more secrets: only the new line is written again.
    buf.push_keys(keys(3, RANDOM_B, "CLIENT_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0"))
    out = pop(buf, 3)
    assert len(out) == 1 and [line.split()[0] for line in out[0].lines] == [  # type: ignore[union-attr]
        "CLIENT_TRAFFIC_SECRET_0"
    ]
    # Same random, changed secret (e.g. a new value read): written again.
    changed = KeyEvent(4 * MS, RANDOM_B, (f"CLIENT_TRAFFIC_SECRET_0 {RANDOM_B.hex()} {'ef' * 32}",),
                       SLOT)
    buf.push_keys(changed)
    assert pop(buf, 4) == [changed]
    # Unchanged event object is passed through as is; other randoms are independent.
    other = keys(5, bytes(range(50, 82)))
    buf.push_keys(other)
    assert pop(buf, 5) == [other]
    s = buf.stats
    assert (s.keys_in, s.keys_out, s.keys_duplicate) == (6, 5, 1)


def prove_slot(buf: ReorderBuffer, check: SelfCheck, slot: int = SLOT) -> None:
    """One session of `slot` whose records prove its keys: the slot is proven."""
    buf.push_packet(pkt(0, TLS_A.hello()))
    buf.push_keys(keys(0.5, RANDOM_A, slot=slot))
    assert times(pop(buf, 1)) == ["K"]
    assert check.slots[slot].verified == 1 and check.state(slot, "1.3") is SlotState.PROVEN


def test_keys_without_client_hello_counted_at_drain() -> None:
    check = slots(SLOT)
    buf = buffer(check)
    prove_slot(buf, check)
    buf.push_keys(keys(1, RANDOM_B))  # a connection on an interface keytap does not capture
    buf.push_packet(pkt(10, PLAIN.data()))
    out = buf.drain()
    assert times(out) == ["K", 0, 10]
    assert buf.stats.keys_without_client_hello == 1
    buf.drain()
    assert buf.stats.keys_without_client_hello == 1  # counted once


def test_forgotten_sessions_count_orphan_keys() -> None:
    check = slots(SLOT)
    buf = buffer(check, max_sessions=3)
    prove_slot(buf, check)
    for i in range(4):
        buf.push_keys(keys(i, bytes([i]) * 32))
        assert len(pop(buf, i)) == 1  # written
    assert buf.stats.keys_without_client_hello == 2  # the two forgotten so far


def test_sessions_idle_longer_than_the_memory_are_forgotten() -> None:
    """At a steady rate of new sessions, what is remembered stops growing (a long capture's
    memory is flat), well before max_sessions."""
    check = slots(SLOT)
    buf = buffer(check, session_memory_ns=1_000_000_000)  # 1 s
    prove_slot(buf, check)
    remembered = []
    for i in range(100):  # a session every 100 ms, for 10 s
        buf.push_keys(keys(100 * i + 50, i.to_bytes(32, "big")))
        pop(buf, 100 * i + 60)
        remembered.append(len(buf._sessions))
    assert max(remembered) <= 12 and buf.stats.keys_out == 101
    # the forgotten ones (the proof's own session, forgotten too, had its ClientHello)
    assert buf.stats.keys_without_client_hello == 100 - len(buf._sessions)


# the proof ----------------------------------------------------------------------------------


def test_unconfirmed_keys_are_dropped_never_written() -> None:
    """No ClientHello carries the random, and the slot never proved itself: no DSB."""
    check = slots(SLOT)
    buf = buffer(check)
    buf.push_keys(keys(5, RANDOM_B))
    out = pop(buf, 4 + KEY_WAIT_MS)
    buf.push_packet(pkt(5 + KEY_WAIT_MS, PLAIN.data()))
    out += pop(buf, 6 + KEY_WAIT_MS) + buf.drain()
    assert times(out) == [5 + KEY_WAIT_MS]
    assert buf.stats.keys_unconfirmed == 1 and buf.stats.keys_out == 0
    # no ClientHello went without keys meanwhile: nothing contradicts the slot
    assert check.slots[SLOT].verified == check.slots[SLOT].protocols["1.3"].contradicted == 0


def test_a_random_that_is_not_on_the_wire_contradicts_its_table() -> None:
    """What a table that reads the wrong field looks like: session A's ClientHello goes out,
    keys come for a random nobody sent. A waits in vain, the keys are dropped."""
    check = slots(SLOT)
    buf = buffer(check)
    buf.push_packet(pkt(10, TLS_A.hello()))
    buf.push_keys(keys(15, RANDOM_B))  # should have been RANDOM_A
    buf.push_packet(pkt(20, TLS_A.data()))
    out = pop(buf, 100)
    assert out == []
    out += pop(buf, 15 + KEY_WAIT_MS)
    assert times(out) == [10, 20]  # A released without keys, and no DSB
    s = buf.stats
    assert (s.sessions_without_keys, s.keys_unconfirmed, s.keys_out) == (1, 1, 0)
    assert check.slots[SLOT].protocols["1.3"].contradicted == 1 and check.slots[SLOT].verified == 0


def test_keyless_hello_long_before_the_keys_does_not_contradict() -> None:
    check = slots(SLOT)
    buf = buffer(check)
    buf.push_packet(pkt(10, TLS_A.hello()))
    assert pop(buf, 20 + KEY_WAIT_MS) != []  # A let go without keys
    buf.push_keys(keys(20 + KEY_WAIT_MS, RANDOM_B))  # later than key_wait after A's hello
    assert buf.drain() == []
    assert check.slots[SLOT].protocols["1.3"].contradicted == 0 and buf.stats.keys_unconfirmed == 1


def test_waiting_keys_are_written_once_another_session_proves_their_slot() -> None:
    buf = buffer()
    buf.push_keys(keys(5, RANDOM_B))  # no ClientHello will come (another interface)
    buf.push_packet(pkt(10, TLS_A.hello()))
    buf.push_keys(keys(12, RANDOM_A))  # proves the slot
    out = pop(buf, 100)
    assert times(out) == ["K", "K", 10]  # B's keys go as soon as the slot is proven
    assert {e.client_random for e in out[:2]} == {RANDOM_A, RANDOM_B}  # type: ignore[union-attr]
    assert pop(buf, 5 + KEY_WAIT_MS) == []
    assert buf.stats.keys_unconfirmed == 0 and buf.stats.keys_without_client_hello == 0
    buf.drain()
    assert buf.stats.keys_without_client_hello == 1


def test_slots_are_proven_separately() -> None:
    check = slots(1, 2)
    buf = buffer(check)
    prove_slot(buf, check, slot=1)
    buf.push_keys(keys(2, RANDOM_B, slot=2))
    assert pop(buf, 3) == []  # slot 2 has proven nothing
    buf.push_keys(keys(3, RANDOM_B, slot=1))
    assert times(pop(buf, 4)) == ["K"]
    (hello,) = buf.drain()
    assert hello._replace(decrypted_by=()) == pkt(0, TLS_A.hello())
    assert [k.slot for k in hello.decrypted_by] == [1]  # whose keys decrypt it: the sink says
    assert buf.stats.keys_unconfirmed == 1


def test_drain_releases_everything_in_order() -> None:
    buf = buffer()
    for ev in (
        pkt(10, TLS_A.hello()),
        pkt(11, TLS_B.hello()),
        pkt(12, PLAIN.data()),
        pkt(13, TLS_B.server_hello()),
        pkt(14, TLS_A.server_hello()),
    ):
        buf.push_packet(ev)
    assert times(pop(buf, 100)) == [12]
    buf.push_packet(pkt(120, PLAIN.data()))
    buf.push_keys(keys(130, RANDOM_B))
    buf.push_keys(keys(131, b"\x77" * 32))  # matches no hello
    out = buf.drain()
    assert times(out) == ["K", "K", 10, 11, 13, 14, 120]
    assert_keys_before_flow(out, RANDOM_B, TLS_B)
    s = buf.stats
    assert (s.tls_sessions_seen, s.sessions_with_keys, s.sessions_without_keys) == (2, 1, 1)
    assert list(s.flows_without_keys) == [TLS_A.key]
    assert s.keys_without_client_hello == 1
    assert len(buf) == 0 and buf.drain() == []


def test_drain_does_not_hold_hellos_still_in_the_heap() -> None:
    buf = buffer()
    buf.push_packet(pkt(10, TLS_A.hello()))
    buf.push_packet(pkt(11, TLS_A.server_hello()))
    assert times(buf.drain()) == [10, 11]
    assert buf.stats.sessions_without_keys == 1


def test_non_ip_and_garbage_frames_pass_through() -> None:
    buf = buffer()
    evs = [pkt(1, b""), pkt(2, b"\xff" * 7), pkt(3, UDP_FRAME), pkt(4, bytes(ETH) + b"\x00" * 5)]
    for ev in evs:
        buf.push_packet(ev)
    assert pop(buf, 60) == evs


def test_random_workload_invariants() -> None:
    """Every event comes out once; keys precede their flows."""
    rng = random.Random(42)
    buf = buffer()
    flows = [Flow(42000 + i, bytes([i + 1]) * 32) for i in range(12)]
    keyed = set(rng.sample(range(12), 8))
    events: list[PacketEvent] = []
    key_events: list[KeyEvent] = []
    for i, flow in enumerate(flows):
        start = rng.randrange(0, 2000)
        ifindex = rng.choice([2, 3])
        events.append(pkt(start, flow.hello(), ifindex))
        for k in range(1, 6):
            events.append(pkt(start + 3 * k, flow.data(reply=k % 2 == 0), ifindex))
        if i in keyed:
            key_events.append(keys(start + rng.randrange(1, 400), flow.random))  # type: ignore[arg-type]
    for t in range(0, 2500, 3):
        events.append(pkt(t, rng.choice([PLAIN.data(), UDP_FRAME]), rng.choice([2, 3])))
    # Arrival order: by ktime with jitter up to 20 ms (ring draining), keys at their ktime.
    arrivals = sorted(
        [(e.ktime_ns + rng.randrange(0, 20 * MS), e) for e in events]
        + [(k.ktime_ns, k) for k in key_events],
        key=lambda x: x[0],
    )
    out: list[Event] = []
    i = 0
    for now in range(0, 5000, 4):
        while i < len(arrivals) and arrivals[i][0] <= now * MS:
            ev = arrivals[i][1]
            if isinstance(ev, KeyEvent):
                buf.push_keys(ev)
            else:
                buf.push_packet(ev)
            i += 1
        out += pop(buf, now)
    out += buf.drain()
    inputs = events + key_events
    named = [e for e in out if isinstance(e, PacketEvent) and e.decrypted_by]
    assert len(named) == len(keyed)  # each keyed session's first ClientHello, once
    assert all(e._replace(decrypted_by=()) in inputs for e in named)
    plain = [e for e in out if not (isinstance(e, PacketEvent) and e.decrypted_by)]
    assert len(out) == len(inputs) and len(set(map(id, plain))) == len(plain)
    assert set(map(id, plain)) <= set(map(id, inputs))
    for i, flow in enumerate(flows):
        if i in keyed:
            assert_keys_before_flow(out, flow.random, flow)  # type: ignore[arg-type]
    s = buf.stats
    assert s.tls_sessions_seen == 12 and s.packets_held > 0
    assert s.sessions_with_keys == 8 and s.sessions_without_keys == 4
    assert len(buf) == 0


def test_a_session_whose_keys_were_written_keeps_neither_keys_nor_packets() -> None:
    """What stays of each of up to max_sessions sessions is small (a long capture's memory is
    bounded by it): not its key lines, KeyEvents or frames once they are written."""
    sessions = 100

    def events_alive() -> int:
        gc.collect()
        return sum(isinstance(o, KeyEvent | PacketEvent) for o in gc.get_objects())

    before = events_alive()  # other tests' leftovers, if any
    buf = buffer()
    t = 0.0
    for index in range(sessions):
        rnd = index.to_bytes(32, "big")
        flow = Flow(20000 + index, rnd)
        buf.push_packet(pkt(t, flow.hello()))
        buf.push_keys(keys(t + 1, rnd))
        buf.push_packet(pkt(t + 2, flow.data()))
        written = pop(buf, t + WINDOW_MS + 3)
        assert written and all(isinstance(e, KeyEvent) for e in written[:1]), index
        t += 10
    del written
    kept = events_alive() - before
    assert kept < 20, f"{kept} key and packet events kept after {sessions} sessions"
    assert len(buf) == 0
