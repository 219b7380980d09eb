"""Reorder buffer: one ktime order for packets and TLS secrets, a TLS flow held until its keys.

Packets leave in ktime order once `window_ns` old (they come from per-CPU rings in batches);
a TLS flow whose ClientHello has no keys yet is set aside, alone, until its keys come or
`key_wait_ns` passes, so that each Decryption Secrets Block is written ahead of the packets it
decrypts. Keys are written only when the self-check says their slot is proven; the buffer
gathers the proof: each TLS connection's first records (merge.tlsstream), against which
tls.proof checks the keys that claim that session. Every session's keys are checked that way,
a candidate layout's and a proven one's alike, and the outcome is counted and reported to the
self-check. Pure logic: no BPF, no I/O, no clock; the caller passes `now_ns` in the ktime
domain. Why a flow, not its interface, waits (timestamps may step back), why sessions are
checked here and not in a process of their own, and the rest of the reasoning:
docs/DESIGN.md, "Reorder buffer" and "Session checks".
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from keytap.events import KeyEvent, PacketEvent
from keytap.merge.tlsstream import ConnectionRecords
from keytap.merge.tlswire import (
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    FlowKey,
    Kind,
    WireInfo,
    classify,
    segment_of,
)
from keytap.tls.proof import REQUIRED, ProofMemo, SessionProof, judged, prove
from keytap.tls.records import TlsRecord
from keytap.tls.selfcheck import SlotState

Event = PacketEvent | KeyEvent
# (ktime_ns, push sequence, event, classification): the sequence keeps the sort stable and
# unique, so tuples never compare their events.
_Entry = tuple[int, int, PacketEvent, WireInfo | None]
Prover = Callable[[Sequence[TlsRecord], Sequence[TlsRecord], Sequence[str], ProofMemo],
                  SessionProof]
_STREAM_FLAGS = TCP_SYN | TCP_FIN | TCP_RST  # what a segment without payload tells a stream


class Judge(Protocol):
    """The self-check as the buffer sees it (tls.selfcheck.SelfCheck)."""

    def state(self, slot: int, protocol: str | None = None) -> SlotState: ...
    def verified(self, slot: int, protocol: str) -> None: ...
    def failed(self, slot: int, protocol: str) -> None: ...
    def contradicted(self, slot: int, protocol: str) -> None: ...
    def unproven(self, slot: int, protocol: str) -> None: ...


@dataclass
class ReorderConfig:
    window_ns: int = 25_000_000  # how long any packet waits for stragglers from other CPUs
    key_wait_ns: int = 1_500_000_000  # longest hold of a TLS flow, from its ClientHello
    max_sessions: int = 16_384  # client randoms remembered (keys seen, lines written, hello seen)
    session_memory_ns: int = 60_000_000_000  # ... and for how long after their last event: a
    # long capture's memory stays flat at a steady rate of new sessions
    max_held_per_flow: int = 16_384  # packets; beyond, the flow is released without keys
    max_flows_reported: int = 1_000  # FlowKeys kept in stats.flows_without_keys
    max_recordings: int = 1_024  # TLS connections whose first records are kept at once
    record_bytes: int = 32 * 1024  # ... per direction
    check_sessions: bool = True  # check each session of a proven slot (else only the proof)
    check_every_ns: int = 10_000_000  # sessions are checked in batches, at most this often:
    # proofs one after another run on warm caches (docs/DESIGN.md, "Session checks")


@dataclass
class ReorderStats:
    packets_in: int = 0
    packets_out: int = 0
    keys_in: int = 0
    keys_out: int = 0
    keys_duplicate: int = 0  # key events with no line not already written
    tls_sessions_seen: int = 0  # distinct ClientHello randoms
    sessions_with_keys: int = 0  # ... whose keys were written before their flow
    sessions_without_keys: int = 0  # ... released without keys (timeout, size cap, drain)
    flows_without_keys: deque[FlowKey] = field(default_factory=deque)  # the latest ones
    keys_without_client_hello: int = 0  # counted when forgotten (LRU) or at drain
    keys_unconfirmed: int = 0  # key events dropped: their slot was never proven in time
    keys_rejected: int = 0  # key events dropped: their slot was rejected
    keys_failed: int = 0  # key events dropped: their own session's records refute them
    keys_after_release: int = 0  # keys that came after their flow was released without them
    packets_held: int = 0  # packets set aside in a held flow
    longest_hold_ns: int = 0
    backsteps: int = 0  # packets written with a ktime older than one already written there
    max_backstep_ns: int = 0
    verification: dict[str, Counter[str]] = field(default_factory=dict)  # class -> outcome
    proofs_run: int = 0  # calls of the prover: the work behind `verification`
    proofs_ns: int = 0  # the time they took (by the wall clock: a CPU clock is a syscall)


@dataclass(eq=False, slots=True)
class _Session:
    """What is known about one client random."""

    keys: bool = False  # some key lines were accepted
    on_wire: bool = False  # a ClientHello with this random was pushed
    hello: bool = False  # ... and reached the head of the heap
    pending: list[KeyEvent] = field(default_factory=list)  # keys waiting for their proof
    accepted: list[KeyEvent] = field(default_factory=list)  # written, their check undecided
    records: ConnectionRecords | None = None  # the connection's first records, while needed
    memo: ProofMemo | None = None  # what its proofs settled so far (kept with `records`)
    flow: FlowKey | None = None
    released_without_keys: bool = False
    orphan_counted: bool = False
    written: tuple[int, ...] = ()  # hashes of the key lines returned, not the lines: a tuple
    # (a set of five took ~700 bytes) of a few
    verified: tuple[int, ...] = ()  # hashes of the lines its records verified
    touched_ns: int = 0  # ktime of its latest ClientHello, keys or recorded packet
    holds: list[_Hold] = field(default_factory=list)
    keyed_by: list[KeyEvent] = field(default_factory=list)  # keys written, for the comment;
    # emptied once that comment is written
    named: bool = False  # its first ClientHello left, carrying `keyed_by`


@dataclass(eq=False, slots=True)
class _Hold:
    """A flow set aside until its session's keys come."""

    flow: FlowKey
    session: _Session
    since_ns: int  # ktime of the ClientHello
    entries: list[_Entry] = field(default_factory=list)
    released: bool = False


class ReorderBuffer:
    """Merge PacketEvents and KeyEvents into the order the pcapng writer must write them."""

    def __init__(
        self,
        config: ReorderConfig | None = None,
        judge: Judge | None = None,
        classify_frame: Callable[[bytes], WireInfo | None] = classify,
        prover: Prover = prove,
    ) -> None:
        self.config = config or ReorderConfig()
        self.stats = ReorderStats(flows_without_keys=deque(maxlen=self.config.max_flows_reported))
        self._judge = judge
        self._classify = classify_frame
        self._prove = prover
        self._seq = itertools.count()
        self._heap: list[_Entry] = []
        self._keys_out: list[KeyEvent] = []
        self._to_release: list[_Hold] = []
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self._held: dict[FlowKey, _Hold] = {}
        self._deadlines: list[tuple[int, int, _Hold]] = []
        self._last_out: dict[int, int] = {}  # ifindex -> newest ktime written
        self._recording: OrderedDict[FlowKey, _Session] = OrderedDict()
        self._frozen: OrderedDict[_Session, None] = OrderedDict()  # recorded, released keyless
        self._dirty: set[_Session] = set()  # sessions with new keys, or new records, to check
        self._checked_ns = -math.inf  # when they were last checked
        self._arrived: list[tuple[_Session, KeyEvent]] = []  # key events not checked yet
        self._waiting: set[_Session] = set()  # sessions with keys waiting for their proof
        self._pending_deadlines: list[tuple[int, int, _Session, KeyEvent]] = []
        self._keyless_hellos: list[int] = []  # sorted ktimes of ClientHellos let go without keys
        self._now = 0
        self._draining = False

    # input --------------------------------------------------------------------------------

    def push_packet(self, ev: PacketEvent) -> None:
        self.stats.packets_in += 1
        info = self._classify(ev.data)
        if info is not None:
            if info.kind is Kind.CLIENT_HELLO and info.client_random:
                self._client_hello_pushed(self._session(info.client_random, ev.ktime_ns),
                                          info, ev)
            elif self._recording and (info.payload_len or info.tcp_flags & _STREAM_FLAGS):
                session = self._recording.get(info.flow)  # (a bare ACK tells a stream nothing)
                if session is not None:
                    self._record(session, ev, info)
        heapq.heappush(self._heap, (ev.ktime_ns, next(self._seq), ev, info))

    def push_keys(self, ev: KeyEvent) -> None:
        self.stats.keys_in += 1
        if not ev.lines:
            return
        if self._state(ev) is SlotState.REJECTED:
            self.stats.keys_rejected += 1
            return
        session = self._session(ev.client_random, ev.ktime_ns)
        session.pending.append(ev)
        self._arrived.append((session, ev))
        self._dirty.add(session)  # checked with the next batch

    # the proof ----------------------------------------------------------------------------

    def _client_hello_pushed(self, session: _Session, info: WireInfo, ev: PacketEvent) -> None:
        session.on_wire = True
        if session.records is not None:
            self._record(session, ev, info)  # a retransmission, or the second ClientHello
            return  # after an HRR
        if session.flow is not None:
            return  # recorded once already; this is the same session through another path
        session.flow = flow = info.flow
        session.records = ConnectionRecords(segment_of(ev.data, info), self.config.record_bytes)
        session.memo = ProofMemo()
        self._recording[flow] = session
        while len(self._recording) > self.config.max_recordings:
            _, oldest = self._recording.popitem(last=False)
            self._stop_recording(oldest)
        if session.pending:
            self._dirty.add(session)

    def _record(self, session: _Session, ev: PacketEvent, info: WireInfo) -> None:
        records = session.records
        assert records is not None
        session.touched_ns = ev.ktime_ns
        grew = records.add(segment_of(ev.data, info))
        if (grew or records.done) and (session.pending or session.accepted):
            self._dirty.add(session)
        if records.done or records.client.complete or records.server.complete:
            # Nothing more will come, or one side has sent all a proof could want (a bulk
            # transfer): record no more, keep what there is (keys may still come late).
            self._freeze(session)

    def _freeze(self, session: _Session) -> None:
        """Keep what was recorded of a session, but record no more of it (bounded, LRU)."""
        if session.flow is not None and self._recording.pop(session.flow, None) is not None:
            self._frozen[session] = None
            if session.accepted:
                self._dirty.add(session)  # the final check of keys already written
            while len(self._frozen) > self.config.max_recordings:
                oldest, _ = self._frozen.popitem(last=False)
                oldest.records = oldest.memo = None

    def _stop_recording(self, session: _Session) -> None:
        if session.flow is not None:
            self._recording.pop(session.flow, None)
        self._frozen.pop(session, None)
        session.records = session.memo = None

    def _proof(self, session: _Session, ev: KeyEvent) -> _Proof | None:
        records, memo = session.records, session.memo
        if records is None or memo is None:
            return None
        self.stats.proofs_run += 1
        started = time.perf_counter_ns()
        proof = self._prove(records.client_records, records.server_records, ev.lines, memo)
        self.stats.proofs_ns += time.perf_counter_ns() - started
        refuted, kept = judged(proof, ev.lines, _finished(records))
        return _Proof(refuted, _lines(ev, kept))

    def _check(self, session: _Session, new_records: bool = True) -> None:
        """Decide what can be decided about a session's keys with the records seen so far
        (with `new_records` False, only what changed in the self-check since)."""
        for ev in list(session.pending):
            state = self._state(ev)
            if state is SlotState.REJECTED:
                session.pending = _without(session.pending, ev)
                self.stats.keys_rejected += 1
                continue
            if state is SlotState.PROVEN and not self.config.check_sessions:
                session.pending = _without(session.pending, ev)
                self._accept(session, ev)
                continue
            if session.verified and all(hash(line) in session.verified for line in ev.lines):
                # Both ends probed (loopback, two pods of a node): the other end's event
                # carried the same secrets, and the records (since let go) verified them.
                session.pending = _without(session.pending, ev)
                self._verified(session, ev, ev.lines)
                self._accept(session, ev)
                continue
            proof = self._proof(session, ev) if new_records else None
            if proof is not None and proof.failed:
                session.pending = _without(session.pending, ev)
                self._refuted(ev)
            elif proof is not None and proof.lines:
                session.pending = _without(session.pending, ev)
                self._verified(session, ev, proof.lines)
                if proof.lines != ev.lines:
                    ev = replace(ev, lines=proof.lines)  # only what the proof covered
                self._accept(session, ev)
            elif state is SlotState.PROVEN:
                # Not refuted, not yet verified (records still to come, or none at all):
                # written now, and checked again once its records are complete.
                session.pending = _without(session.pending, ev)
                self._accept_unchecked(session, ev)
        if new_records and session.accepted and session.flow not in self._recording:
            self._check_accepted(session)  # its records are all there will be: check once
        self._settle(session)

    def _settle(self, session: _Session) -> None:
        if not session.pending:
            self._waiting.discard(session)
            if not session.accepted and session.keys:
                self._stop_recording(session)

    def _accept_unchecked(self, session: _Session, ev: KeyEvent) -> None:
        """A proven slot's keys, written before their session's check decided anything."""
        session.accepted.append(ev)
        self._accept(session, ev)

    def _refuted(self, ev: KeyEvent, written: bool = False) -> None:
        """Its own session's records refute `ev`: dropped, unless it was written already."""
        if not written:
            self.stats.keys_failed += 1
        self._count(ev, "failed")
        if self._judge is not None:
            self._judge.failed(ev.slot, ev.protocol)

    def _check_accepted(self, session: _Session) -> None:
        """Check keys written before their session's records could decide (they are all
        there will be now): the outcome is counted; refuted, they count as failed."""
        for ev in list(session.accepted):
            proof = self._proof(session, ev)
            if proof is None or not (proof.failed or proof.lines):
                continue  # counted "unchecked" when the session is forgotten
            session.accepted = _without(session.accepted, ev)
            if proof.failed:
                self._refuted(ev, written=True)
            else:
                self._verified(session, ev, proof.lines)
        self._settle(session)  # its records go once nothing is left to check

    def _verified(self, session: _Session, ev: KeyEvent, lines: tuple[str, ...]) -> None:
        """`lines` of `ev` decrypted their session's records."""
        session.verified = tuple(dict.fromkeys((*session.verified, *map(hash, lines))))
        self._count(ev, "verified")
        if self._judge is not None:
            self._judge.verified(ev.slot, ev.protocol)

    def _count(self, ev: KeyEvent, outcome: str) -> None:
        kind = f"TLS {ev.protocol} {'server' if ev.server else 'client'}"
        self.stats.verification.setdefault(kind, Counter())[outcome] += 1

    def _state(self, ev: KeyEvent) -> SlotState:
        if self._judge is None:
            return SlotState.REJECTED
        return self._judge.state(ev.slot, ev.protocol)

    def _expire_pending(self, now_ns: float) -> None:
        """Keys still unproven key_wait_ns after they came: dropped, and judged."""
        deadlines = self._pending_deadlines
        while deadlines and deadlines[0][0] <= now_ns:
            _, _, session, ev = heapq.heappop(deadlines)
            if not _among(ev, session.pending):
                continue  # decided meanwhile
            self._check(session)
            if not _among(ev, session.pending):
                continue
            session.pending = _without(session.pending, ev)
            if not session.pending:
                self._waiting.discard(session)
            self.stats.keys_unconfirmed += 1
            self._count(ev, "unchecked")
            if self._judge is None:
                continue
            labels = {line.split(" ", 1)[0] for line in ev.lines}
            if session.on_wire and not REQUIRED[ev.protocol] <= labels:
                self._judge.unproven(ev.slot, ev.protocol)  # secrets it should have are zeros
            elif not session.on_wire and self._keyless_hello_between(
                    ev.ktime_ns - self.config.key_wait_ns, ev.ktime_ns):
                self._judge.contradicted(ev.slot, ev.protocol)
        horizon = self._now - 2 * self.config.key_wait_ns
        del self._keyless_hellos[:bisect.bisect_left(self._keyless_hellos, horizon)]

    def _keyless_hello_between(self, start_ns: int, end_ns: int) -> bool:
        index = bisect.bisect_left(self._keyless_hellos, start_ns)
        return index < len(self._keyless_hellos) and self._keyless_hellos[index] <= end_ns

    def _accept(self, session: _Session, ev: KeyEvent) -> None:
        """Proven keys: what is new in them is written next, and their flows are let go."""
        new = tuple(dict.fromkeys(line for line in ev.lines
                                  if hash(line) not in session.written))
        if not new:
            self.stats.keys_duplicate += 1
            return
        session.written += tuple(map(hash, new))
        if not session.named:
            session.keyed_by.append(ev)
        late = session.released_without_keys and not session.holds
        if new != ev.lines or late:
            ev = replace(ev, lines=new, late=late)
        self._keys_out.append(ev)
        if session.keys:
            return
        session.keys = True
        if session.holds:
            self._to_release.extend(session.holds)
        elif session.released_without_keys:
            self.stats.keys_after_release += 1

    # output -------------------------------------------------------------------------------

    def pop_ready(self, now_ns: int) -> list[Event]:
        """Events that may be written now, in the order to write them."""
        self._now = max(self._now, now_ns)
        if (self._dirty or self._waiting) and (
                self._now - self._checked_ns >= self.config.check_every_ns):
            self._check_dirty()
        out: list[Event] = self._take_keys()
        while self._deadlines and self._deadlines[0][0] <= now_ns:
            hold = heapq.heappop(self._deadlines)[2]
            if not hold.released:
                self._release(hold, with_keys=False)
        self._expire_pending(now_ns)
        out += self._take_keys()  # keys of slots proven by another session meanwhile
        self._run(now_ns - self.config.window_ns, now_ns, out)
        return out

    def _check_dirty(self) -> None:
        self._checked_ns = self._now
        dirty, self._dirty = self._dirty, set()
        arrived, self._arrived = self._arrived, []
        for session in dirty:
            self._check(session)
        for session, ev in arrived:
            if _among(ev, session.pending):  # not decided by its first check: waits, at most
                deadline = ev.ktime_ns + self.config.key_wait_ns  # key_wait_ns
                heapq.heappush(self._pending_deadlines, (deadline, next(self._seq), session, ev))
                self._waiting.add(session)
        for session in list(self._waiting):
            self._check(session, new_records=False)  # its slot may have been decided meanwhile

    def drain(self) -> list[Event]:
        """Everything still buffered, in order: for shutdown. Nothing is held any more."""
        self._draining = True
        try:
            self._check_dirty()
            out: list[Event] = self._take_keys()
            for hold in list(self._held.values()):
                self._release(hold, with_keys=False)
            self._expire_pending(math.inf)
            out += self._take_keys()
            self._run(math.inf, self._now, out)
            for session in self._sessions.values():
                self._forget(session)
            return out
        finally:
            self._draining = False

    def __len__(self) -> int:
        """Events buffered (for memory monitoring)."""
        return (len(self._heap) + len(self._keys_out) + len(self._pending_deadlines)
                + sum(len(h.entries) for h in self._held.values()))

    # internals ----------------------------------------------------------------------------

    def _take_keys(self) -> list[Event]:
        out: list[Event] = list(self._keys_out)
        self.stats.keys_out += len(out)
        self._keys_out.clear()
        for hold in self._to_release:
            if not hold.released:
                self._release(hold, with_keys=True)
        self._to_release.clear()
        return out

    def _run(self, until: float, now_ns: int, out: list[Event]) -> None:
        """Move every packet with ktime <= until out of the heap: written or held."""
        heap = self._heap
        held = self._held
        while heap and heap[0][0] <= until:
            entry = heapq.heappop(heap)
            ktime, _, ev, info = entry
            if info is not None and held:
                hold = held.get(info.flow)
                if hold is not None:
                    self._hold_entry(hold, entry)
                    continue
            if (info is not None and info.kind is Kind.CLIENT_HELLO
                    and info.client_random is not None):
                if self._client_hello(entry, info, now_ns):
                    continue
                ev = self._named(ev, info.client_random)
            last = self._last_out.get(ev.ifindex)
            if last is None or ktime >= last:
                self._last_out[ev.ifindex] = ktime
            else:
                self.stats.backsteps += 1
                self.stats.max_backstep_ns = max(self.stats.max_backstep_ns, last - ktime)
            self.stats.packets_out += 1
            out.append(ev)

    def _client_hello(self, entry: _Entry, info: WireInfo, now_ns: int) -> bool:
        """Account for a ClientHello at the head; True if it starts a hold (entry is taken)."""
        assert info.client_random is not None
        session = self._session(info.client_random, entry[0])
        if not session.hello:
            session.hello = True
            self.stats.tls_sessions_seen += 1
            if session.keys:
                self.stats.sessions_with_keys += 1
                return False
        elif session.keys or not session.holds:
            return False  # a retransmission, or the session was already let go
        # No keys yet: hold this flow (a second flow for the same random, e.g. the same session
        # seen through NAT on another interface, waits with the first).
        ktime = entry[0]
        deadline = ktime + self.config.key_wait_ns
        if self._draining or deadline <= now_ns:
            self._without_keys(session, info.flow, ktime)
            return False
        hold = _Hold(info.flow, session, ktime)
        session.holds.append(hold)
        self._held[info.flow] = hold
        heapq.heappush(self._deadlines, (deadline, entry[1], hold))
        self._hold_entry(hold, entry)
        return True

    def _named(self, ev: PacketEvent, client_random: bytes) -> PacketEvent:
        """A session's first ClientHello to leave with keys written carries them: the sink
        names the processes they came from."""
        session = self._sessions.get(client_random)
        if session is None or session.named or not session.keyed_by:
            return ev
        session.named = True
        keyed_by, session.keyed_by = tuple(session.keyed_by), []
        return ev._replace(decrypted_by=keyed_by)

    def _hold_entry(self, hold: _Hold, entry: _Entry) -> None:
        hold.entries.append(entry)
        self.stats.packets_held += 1
        if len(hold.entries) > self.config.max_held_per_flow:
            self._release(hold, with_keys=False)

    def _release(self, hold: _Hold, with_keys: bool) -> None:
        """Merge a held flow back into the heap (its packets are due, so they leave next)."""
        hold.released = True
        del self._held[hold.flow]
        session = hold.session
        session.holds.remove(hold)
        # At drain there may be no recent `now`: the newest held packet bounds the hold then.
        end = max(self._now, hold.entries[-1][0]) if hold.entries else self._now
        self.stats.longest_hold_ns = max(self.stats.longest_hold_ns, end - hold.since_ns)
        if with_keys:
            if not session.holds:
                self.stats.sessions_with_keys += 1
        else:
            self._without_keys(session, hold.flow, hold.since_ns)
        for entry in hold.entries:
            heapq.heappush(self._heap, entry)
        hold.entries = []

    def _without_keys(self, session: _Session, flow: FlowKey, hello_ns: int) -> None:
        self.stats.flows_without_keys.append(flow)
        if not session.released_without_keys:
            session.released_without_keys = True
            self.stats.sessions_without_keys += 1
            bisect.insort(self._keyless_hellos, hello_ns)

    def _session(self, client_random: bytes, now_ns: int) -> _Session:
        sessions = self._sessions
        session = sessions.get(client_random)
        if session is not None:
            sessions.move_to_end(client_random)
            session.touched_ns = max(session.touched_ns, now_ns)
            return session
        session = sessions[client_random] = _Session(touched_ns=now_ns)
        excess = len(sessions) - self.config.max_sessions
        horizon = now_ns - self.config.session_memory_ns
        for _ in range(len(sessions) - 1):  # the oldest first, each looked at once at most
            old_random, old = next(iter(sessions.items()))
            if excess <= 0 and old.touched_ns >= horizon:
                break
            del sessions[old_random]
            if old.holds or old.pending:  # still needed: keep it, look at the next oldest
                sessions[old_random] = old
                continue
            self._forget(old)
            excess -= 1
        return session

    def _forget(self, session: _Session) -> None:
        """Count keys whose ClientHello never showed up, and checks never decided, once."""
        self._check_accepted(session)
        for ev in session.accepted:
            self._count(ev, "unchecked")
        session.accepted = []
        self._stop_recording(session)
        if session.keys and not session.hello and not session.orphan_counted:
            session.orphan_counted = True
            self.stats.keys_without_client_hello += 1


def _among(ev: KeyEvent, events: list[KeyEvent]) -> bool:
    return any(ev is other for other in events)


def _without(events: list[KeyEvent], ev: KeyEvent) -> list[KeyEvent]:
    """`events` but `ev` itself (key events compare by value: `remove` could take its twin)."""
    return [other for other in events if other is not ev]


def _lines(ev: KeyEvent, kept: tuple[int, ...]) -> tuple[str, ...]:
    """The lines of `ev` a proof kept (their indices, from tls.proof.judged)."""
    return tuple(ev.lines[i] for i in kept)


def _finished(records: ConnectionRecords) -> tuple[bool, bool]:
    """Whether the client, and the server, will send no more."""
    return records.finished(client=True), records.finished(client=False)


@dataclass(frozen=True, slots=True)
class _Proof:
    """What a session's records say of one key event."""

    failed: bool  # a record did not decrypt under one of its secrets
    lines: tuple[str, ...]  # its lines, once proven (else empty): see tls.proof.judged
