"""Reorder buffer: one ktime order for packets and TLS secrets, a TLS flow held until its keys.

Why a buffer at all: packets come from per-CPU rings that user space drains in batches, so they
reach us out of order; and OpenSSL hands over a session's secrets only after its ClientHello has
gone out (about one round trip later, plus ring latency). The pcapng must nevertheless carry each
Decryption Secrets Block (DSB) before the packets it decrypts, because Wireshark and tshark load
secrets as they read the file: a DSB that comes after a session's handshake is too late.

Pure logic: no BPF, no I/O, no clock. The caller passes `now_ns` in the ktime domain
(CLOCK_MONOTONIC, what `bpf_ktime_get_ns()` returns) and writes whatever `pop_ready` returns.

Order. Packets sit in a heap keyed by (ktime_ns, push sequence) and leave once they are
`window_ns` old, so packets from all CPUs and interfaces merge into ktime order.

Keys. A KeyEvent is returned by the very next `pop_ready` after it is confirmed (below), ahead of
every packet returned by that call. A DSB has neither a timestamp nor an interface, so writing it
earlier than its ktime changes nothing a reader can see, and it is then guaranteed to precede
every packet of its session that is not written yet. Keys are deduplicated per client random:
lines already written are dropped and an event with no new line is not returned (an event with
some new lines is returned with only those).

Confirmation (the wire half of the self-check). Secrets read at wrong struct offsets can look
plausible: the only proof that a table reads the right memory is that the client random it read
is one a ClientHello carried on the wire. So keys are checked per origin (the table that read
them): an event whose random was seen in a ClientHello (at push, before any window) is written
and confirms its origin; an event of an origin with no confirmation yet waits up to
`key_wait_ns` for its ClientHello and is dropped if none comes (`keys_unconfirmed`): no DSB from
an unproven table, ever. Such a drop *contradicts* its origin when a ClientHello of the same
moments (up to `key_wait_ns` earlier) went without keys: the table probably read another
connection's random, or another field. The key source switches off an origin with
contradictions and no confirmation (`origins`). Once confirmed, an origin's keys are written at
once; those whose random never shows up (a connection on another interface) are counted.

Holding. When a ClientHello (recognized from bytes, see `tlswire`) reaches the head of the heap
and its random has no keys yet, its flow is held: the ClientHello and every later packet of the
same FlowKey are set aside, while all other flows keep moving. The hold ends when keys arrive
(their DSB is returned first, then the held packets, merged back in ktime order) or `key_wait_ns`
after the ClientHello (released without keys and counted: Wireshark will not decrypt it). Keys
that came before the ClientHello mean no hold at all. A FIN or RST does not end a hold: OpenSSL
may hand over the secrets of a short connection after it has closed.

Timestamps: the policy. The requirements collide whenever keys come later than `window_ns`
after the ClientHello. By then packets of other flows captured after the ClientHello on the same
interface are due. Either they wait too, and every interface's timestamps stay non-decreasing,
but unrelated (even non-TLS) traffic waits for somebody else's keys for up to `key_wait_ns`, with
that much of the interface's traffic in memory; or they do not wait, and the held packets are
written later than newer packets with their true timestamps, so that interface's time steps back.
Re-stamping late packets with the last written time would keep both rules only by falsifying the
capture (RTTs, TLS timing), so it is not offered. `HoldPolicy` names the two honest choices:

* `HoldPolicy.FLOW` (the default): only the TLS flow waits; its packets keep their true ktime.
* `HoldPolicy.INTERFACE`: strictly non-decreasing time per interface; while a flow is held, the
  packets of its interfaces that are newer than the held flow's first packet there wait with it.

FLOW is the default because (1) in the common case it writes the same perfectly ordered file as
INTERFACE: keys from OpenSSL normally arrive within the window, and a hold that ends within the
window reorders nothing; (2) the case where they differ is dominated by sessions whose keys never
come (TLS not done by OpenSSL: Go, Java, rustls, all common in pods), where INTERFACE would stall
the whole interface for `key_wait_ns` at every such handshake, i.e. under steady load keep the
pod's traffic permanently `key_wait_ns` behind and in memory, for no decryption gain; (3) what a
Wireshark user sees is benign: every packet has its true capture time, every TCP stream is in
order (per-flow order is kept, so TCP analysis is unaffected), decryption works, and a flow
released late shows up in the packet list as a block after packets captured later (a negative
delta time at its first packet; sorting by the Time column gives the chronological view).
pcapng allows timestamps out of order and Wireshark/tshark read such files as they are. The
stats count what FLOW did (`backsteps`, `max_backstep_ns`) so it can be reported; choose
INTERFACE when a strictly chronological file matters more than latency and memory.

Cost: O(log n) heap operations per event; a held flow's packets are set aside and merged back
once each (under INTERFACE, a packet may wait again for another held flow on its interface).
"""

from __future__ import annotations

import bisect
import enum
import heapq
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from keytap.events import KeyEvent, PacketEvent
from keytap.merge.tlswire import FlowKey, Kind, WireInfo, classify

Event = PacketEvent | KeyEvent
# (ktime_ns, push sequence, event, classification): the sequence keeps the sort stable and
# unique, so tuples never compare their events.
_Entry = tuple[int, int, PacketEvent, WireInfo | None]


class HoldPolicy(enum.Enum):
    """Who waits while a TLS flow waits for its keys (see the module docstring)."""

    FLOW = "flow"  # only the flow; late-released packets keep true ktime, time may step back
    INTERFACE = "interface"  # also newer packets on its interfaces; time never steps back


@dataclass
class ReorderConfig:
    window_ns: int = 25_000_000  # how long any packet waits for stragglers from other CPUs
    key_wait_ns: int = 1_500_000_000  # longest hold of a TLS flow, from its ClientHello
    policy: HoldPolicy = HoldPolicy.FLOW
    max_sessions: int = 16_384  # client randoms remembered (keys seen, lines written, hello seen)
    max_held_per_flow: int = 16_384  # packets; beyond, the flow is released without keys
    max_flows_reported: int = 1_000  # FlowKeys kept in stats.flows_without_keys


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
    keys_unconfirmed: int = 0  # key events dropped: unproven origin, random never on the wire
    keys_after_release: int = 0  # keys that came after their flow was released without them
    packets_held: int = 0  # packets set aside in a held flow
    packets_blocked: int = 0  # times a packet waited for another flow (HoldPolicy.INTERFACE)
    longest_hold_ns: int = 0
    backsteps: int = 0  # packets written with a ktime older than one already written there
    max_backstep_ns: int = 0


@dataclass
class OriginCheck:
    """The wire check of one key origin: do the client randoms it reads show up on the wire?"""

    confirmed: int = 0  # key events whose random a ClientHello carried
    contradicted: int = 0  # dropped events: never on the wire, while a ClientHello went keyless


@dataclass(eq=False, slots=True)
class _Session:
    """What is known about one client random."""

    keys: bool = False  # some key lines came
    on_wire: bool = False  # a ClientHello with this random was pushed
    hello: bool = False  # ... and reached the head of the heap
    pending: list[KeyEvent] = field(default_factory=list)  # keys waiting for confirmation
    released_without_keys: bool = False
    orphan_counted: bool = False
    written: set[str] = field(default_factory=set)  # key lines already returned
    holds: list[_Hold] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Hold:
    """A flow set aside until its session's keys come."""

    flow: FlowKey
    session: _Session
    since_ns: int  # ktime of the ClientHello
    entries: list[_Entry] = field(default_factory=list)
    first_ns: dict[int, int] = field(default_factory=dict)  # ifindex -> first held ktime
    released: bool = False


class ReorderBuffer:
    """Merge PacketEvents and KeyEvents into the order the pcapng writer must write them."""

    def __init__(
        self,
        config: ReorderConfig | None = None,
        classify_frame: Callable[[bytes], WireInfo | None] = classify,
    ) -> None:
        self.config = config or ReorderConfig()
        self.stats = ReorderStats(flows_without_keys=deque(maxlen=self.config.max_flows_reported))
        self._classify = classify_frame
        self._strict = self.config.policy is HoldPolicy.INTERFACE
        self._seq = itertools.count()
        self._heap: list[_Entry] = []
        self._keys_out: list[KeyEvent] = []
        self._to_release: list[_Hold] = []
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self._held: dict[FlowKey, _Hold] = {}
        self._deadlines: list[tuple[int, int, _Hold]] = []
        self._barrier: dict[int, int] = {}  # ifindex -> oldest held ktime there (INTERFACE)
        self._blocked: dict[int, list[_Entry]] = {}  # ifindex -> heap of waiting packets
        self._last_out: dict[int, int] = {}  # ifindex -> newest ktime written
        self.origins: dict[int, OriginCheck] = {}
        self._pending_deadlines: list[tuple[int, int, _Session, KeyEvent]] = []
        self._keyless_hellos: list[int] = []  # sorted ktimes of ClientHellos let go without keys
        self._now = 0
        self._draining = False

    # input --------------------------------------------------------------------------------

    def push_packet(self, ev: PacketEvent) -> None:
        self.stats.packets_in += 1
        info = self._classify(ev.data)
        if info is not None and info.kind is Kind.CLIENT_HELLO and info.client_random:
            self._seen_on_wire(self._session(info.client_random))
        heapq.heappush(self._heap, (ev.ktime_ns, next(self._seq), ev, info))

    def push_keys(self, ev: KeyEvent) -> None:
        self.stats.keys_in += 1
        if not ev.lines:
            return
        session = self._session(ev.client_random)
        origin = self.origins.setdefault(ev.origin, OriginCheck())
        if session.on_wire:
            origin.confirmed += 1
            self._accept(session, ev)
        elif origin.confirmed:
            self._accept(session, ev)
        else:
            session.pending.append(ev)
            deadline = ev.ktime_ns + self.config.key_wait_ns
            heapq.heappush(self._pending_deadlines, (deadline, next(self._seq), session, ev))

    # confirmation -------------------------------------------------------------------------

    def _seen_on_wire(self, session: _Session) -> None:
        session.on_wire = True
        for ev in session.pending:
            self.origins[ev.origin].confirmed += 1
            self._accept(session, ev)
        session.pending.clear()

    def _expire_pending(self, now_ns: float) -> None:
        """Keys whose ClientHello did not come within key_wait_ns: judged by their origin."""
        deadlines = self._pending_deadlines
        while deadlines and deadlines[0][0] <= now_ns:
            _, _, session, ev = heapq.heappop(deadlines)
            if not any(ev is waiting for waiting in session.pending):
                continue  # confirmed meanwhile
            session.pending.remove(ev)
            origin = self.origins[ev.origin]
            if origin.confirmed:  # proven by another session since: a connection not captured
                self._accept(session, ev)
                continue
            self.stats.keys_unconfirmed += 1
            if self._keyless_hello_between(ev.ktime_ns - self.config.key_wait_ns, ev.ktime_ns):
                origin.contradicted += 1
        horizon = self._now - 2 * self.config.key_wait_ns
        del self._keyless_hellos[:bisect.bisect_left(self._keyless_hellos, horizon)]

    def _keyless_hello_between(self, start_ns: int, end_ns: int) -> bool:
        index = bisect.bisect_left(self._keyless_hellos, start_ns)
        return index < len(self._keyless_hellos) and self._keyless_hellos[index] <= end_ns

    def _accept(self, session: _Session, ev: KeyEvent) -> None:
        """Confirmed keys: what is new in them is written next, and their flows are let go."""
        new = tuple(dict.fromkeys(line for line in ev.lines if line not in session.written))
        if not new:
            self.stats.keys_duplicate += 1
            return
        session.written.update(new)
        self._keys_out.append(ev if new == ev.lines else replace(ev, lines=new))
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
        out: list[Event] = self._take_keys()
        while self._deadlines and self._deadlines[0][0] <= now_ns:
            hold = heapq.heappop(self._deadlines)[2]
            if not hold.released:
                self._release(hold, with_keys=False)
        self._expire_pending(now_ns)
        out += self._take_keys()  # keys of origins confirmed by another session meanwhile
        self._run(now_ns - self.config.window_ns, now_ns, out)
        return out

    def drain(self) -> list[Event]:
        """Everything still buffered, in order: for shutdown. Nothing is held any more."""
        self._draining = True
        try:
            out: list[Event] = self._take_keys()
            for hold in list(self._held.values()):
                self._release(hold, with_keys=False)
            self._expire_pending(math.inf)
            out += self._take_keys()
            for waiting in self._blocked.values():
                for entry in waiting:
                    heapq.heappush(self._heap, entry)
            self._blocked.clear()
            self._barrier.clear()
            self._run(math.inf, self._now, out)
            for session in self._sessions.values():
                self._forget(session)
            return out
        finally:
            self._draining = False

    def next_wakeup_ns(self) -> int | None:
        """When `pop_ready` may next return something (ktime), or None if nothing is buffered."""
        if self._keys_out or self._to_release:
            return self._now
        while self._deadlines and self._deadlines[0][2].released:
            heapq.heappop(self._deadlines)
        times = [self._deadlines[0][0]] if self._deadlines else []
        if self._pending_deadlines:
            times.append(self._pending_deadlines[0][0])
        if self._heap:
            times.append(self._heap[0][0] + self.config.window_ns)
        return min(times) if times else None

    def __len__(self) -> int:
        """Events buffered (for memory monitoring)."""
        return (
            len(self._heap)
            + len(self._keys_out)
            + len(self._pending_deadlines)
            + sum(len(h.entries) for h in self._held.values())
            + sum(len(b) for b in self._blocked.values())
        )

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
        """Move every packet with ktime <= until out of the heap: written, held or blocked."""
        heap = self._heap
        held = self._held
        strict = self._strict
        while heap and heap[0][0] <= until:
            entry = heapq.heappop(heap)
            ktime, _, ev, info = entry
            if info is not None and held:
                hold = held.get(info.flow)
                if hold is not None:
                    self._hold_entry(hold, entry)
                    continue
            if strict:
                barrier = self._barrier.get(ev.ifindex)
                if barrier is not None and ktime > barrier:
                    heapq.heappush(self._blocked.setdefault(ev.ifindex, []), entry)
                    self.stats.packets_blocked += 1
                    continue
            if (
                info is not None
                and info.kind is Kind.CLIENT_HELLO
                and info.client_random is not None
                and self._client_hello(entry, info, now_ns)
            ):
                continue
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
        session = self._session(info.client_random)
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

    def _hold_entry(self, hold: _Hold, entry: _Entry) -> None:
        hold.entries.append(entry)
        self.stats.packets_held += 1
        if self._strict:
            ifindex = entry[2].ifindex
            if ifindex not in hold.first_ns:
                hold.first_ns[ifindex] = entry[0]
                barrier = self._barrier.get(ifindex)
                if barrier is None or entry[0] < barrier:
                    self._barrier[ifindex] = entry[0]
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
        if self._strict:
            for ifindex in hold.first_ns:
                self._lower_barrier(ifindex)

    def _lower_barrier(self, ifindex: int) -> None:
        """Recompute an interface's barrier after a release and let through what may go."""
        firsts = [h.first_ns[ifindex] for h in self._held.values() if ifindex in h.first_ns]
        barrier = min(firsts) if firsts else None
        if barrier is None:
            self._barrier.pop(ifindex, None)
        else:
            self._barrier[ifindex] = barrier
        waiting = self._blocked.get(ifindex)
        while waiting and (barrier is None or waiting[0][0] <= barrier):
            heapq.heappush(self._heap, heapq.heappop(waiting))

    def _without_keys(self, session: _Session, flow: FlowKey, hello_ns: int) -> None:
        self.stats.flows_without_keys.append(flow)
        if not session.released_without_keys:
            session.released_without_keys = True
            self.stats.sessions_without_keys += 1
            bisect.insort(self._keyless_hellos, hello_ns)

    def _session(self, client_random: bytes) -> _Session:
        sessions = self._sessions
        session = sessions.get(client_random)
        if session is not None:
            sessions.move_to_end(client_random)
            return session
        session = sessions[client_random] = _Session()
        for _ in range(len(sessions) - self.config.max_sessions):
            old_random, old = sessions.popitem(last=False)
            if old.holds or old.pending:  # still needed: keep it, forget the next oldest
                sessions[old_random] = old
                continue
            self._forget(old)
        return session

    def _forget(self, session: _Session) -> None:
        """Count keys whose ClientHello never showed up, once."""
        if session.keys and not session.hello and not session.orphan_counted:
            session.orphan_counted = True
            self.stats.keys_without_client_hello += 1
