"""The self-check: which layout slots' keys may reach the file, decided from what the wire shows.

A slot (one layout, read in the kernel for one OpenSSL build) starts as a CANDIDATE unless the
same build's layout was proven in an earlier capture. Its keys are written only once it is
PROVEN: one session's secrets decrypted that session's own records, every tag or MAC
verifying (tls.proof, run by the reorder buffer). Separately per protocol: TLS 1.2 reads the
session's master key, TLS 1.3 the connection's secret arrays and the cipher, and a layout can
be right for one and wrong for the other. Facts come in from two sides:

- the reorder buffer: a session verified or failed, keys of a recorded session that stayed
  unproven, a key event dropped while ClientHellos of the same moments went without keys (a
  contradiction);
- the key source: per-slot counts of implausible reads.

A candidate that fails once (a record that does not decrypt under its secrets is proof it reads
the wrong memory), reads only implausible values, or is contradicted or left unproven
SELF_CHECK_FAILURES times with no proof is REJECTED; when one candidate of a build is
proven, its siblings are rejected too. A proven slot whose sessions start failing is switched
off. Every verdict goes to the listeners
(tls.probes: switch the slot off in the kernel, load the next candidate, tell the user).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

SELF_CHECK_FAILURES = 3


class SlotState(enum.Enum):
    CANDIDATE = "candidate"  # keys wait for a proof
    PROVEN = "proven"  # keys are written (and each session is still verified)
    REJECTED = "rejected"  # keys are dropped


PROTOCOLS = ("1.2", "1.3")  # a layout proven on TLS 1.2 sessions says nothing of TLS 1.3's


@dataclass
class ProtocolCheck:
    """What is known about one slot's reads of one protocol's secrets."""

    state: SlotState = SlotState.CANDIDATE
    verified: int = 0  # sessions whose secrets decrypted their records
    failed: int = 0  # sessions whose records did not decrypt
    failed_in_a_row: int = 0
    contradicted: int = 0
    unproven: int = 0


@dataclass
class SlotCheck:
    """What is known about one slot: per protocol, and why it was last decided."""

    build: str  # the OpenSSL build it reads (siblings share it)
    protocols: dict[str, ProtocolCheck] = field(
        default_factory=lambda: {p: ProtocolCheck() for p in PROTOCOLS})
    reason: str = ""

    @property
    def state(self) -> SlotState:
        """PROVEN for some protocol, REJECTED for all, else CANDIDATE."""
        states = {check.state for check in self.protocols.values()}
        if SlotState.PROVEN in states:
            return SlotState.PROVEN
        return SlotState.REJECTED if states == {SlotState.REJECTED} else SlotState.CANDIDATE

    @property
    def verified(self) -> int:
        return sum(check.verified for check in self.protocols.values())


Verdict = Callable[[int, SlotCheck], None]


class SelfCheck:
    """Holds every slot's state; the reorder buffer asks `state(slot, protocol)` for each key
    event."""

    def __init__(self) -> None:
        self.listeners: list[Verdict] = []
        self.slots: dict[int, SlotCheck] = {}

    def add(self, slot: int, build: str, proven: Collection[str] = ()) -> None:
        check = SlotCheck(build)
        for protocol in proven:
            check.protocols[protocol].state = SlotState.PROVEN
        self.slots[slot] = check

    def state(self, slot: int, protocol: str | None = None) -> SlotState:
        check = self.slots.get(slot)
        if check is None:
            return SlotState.REJECTED
        return check.state if protocol is None else check.protocols[protocol].state

    def proven_protocols(self, slot: int) -> list[str]:
        check = self.slots.get(slot)
        return [] if check is None else [p for p, c in check.protocols.items()
                                         if c.state is SlotState.PROVEN]

    # reports from the reorder buffer ---------------------------------------------------------

    def _of(self, slot: int, protocol: str) -> tuple[SlotCheck, ProtocolCheck] | None:
        check = self.slots.get(slot)
        return None if check is None else (check, check.protocols[protocol])

    def verified(self, slot: int, protocol: str) -> None:
        found = self._of(slot, protocol)
        if found is None:
            return
        check, this = found
        this.verified += 1
        this.failed_in_a_row = 0
        if this.state is SlotState.CANDIDATE:
            self._decide(slot, protocol, SlotState.PROVEN,
                         f"a TLS {protocol} session's records decrypted under its keys")
            for sibling, other in list(self.slots.items()):  # verdicts may add slots
                if (other.build == check.build and sibling != slot
                        and other.protocols[protocol].state is SlotState.CANDIDATE):
                    self._decide(sibling, protocol, SlotState.REJECTED,
                                 f"another layout was proven for TLS {protocol}")

    def failed(self, slot: int, protocol: str) -> None:
        found = self._of(slot, protocol)
        if found is None:
            return
        this = found[1]
        this.failed += 1
        this.failed_in_a_row += 1
        if this.state is SlotState.CANDIDATE:
            self._decide(slot, protocol, SlotState.REJECTED, f"a TLS {protocol} session's "
                         "records did not decrypt under the secrets it read")
        elif this.state is SlotState.PROVEN and this.failed_in_a_row >= SELF_CHECK_FAILURES:
            self._decide(slot, protocol, SlotState.REJECTED,
                         f"{this.failed_in_a_row} TLS {protocol} sessions in a row did not "
                         "decrypt under the secrets it read")

    def contradicted(self, slot: int, protocol: str) -> None:
        """Keys dropped unproven whose random no ClientHello carried, while ClientHellos of
        the same moments went without keys."""
        self._doubt(slot, protocol, "contradicted", "the client randoms of {} handshakes were "
                    "in no ClientHello on the wire")

    def unproven(self, slot: int, protocol: str) -> None:
        """Keys of a recorded session that lack a secret they must have (read as zeros)."""
        self._doubt(slot, protocol, "unproven", "the keys of {} recorded TLS sessions could "
                    "not be proven from their records")

    def _doubt(self, slot: int, protocol: str, counter: str, reason: str) -> None:
        """Count evidence short of a refutation: enough of it rejects a candidate that was
        never proven."""
        found = self._of(slot, protocol)
        if found is None:
            return
        this = found[1]
        count = getattr(this, counter) + 1
        setattr(this, counter, count)
        if (this.state is SlotState.CANDIDATE and not this.verified
                and count >= SELF_CHECK_FAILURES):
            self._decide(slot, protocol, SlotState.REJECTED, reason.format(count))

    # reports from the key source -------------------------------------------------------------

    def implausible(self, slot: int, protocol: str | None, implausible: int,
                    plausible: int) -> None:
        """Reads that failed a sanity check: of one protocol's secrets (e.g. a cipher id no
        suite has), or with no protocol at all (a version out of range: the whole slot)."""
        check = self.slots.get(slot)
        if check is None or plausible or implausible < SELF_CHECK_FAILURES:
            return
        current = check.state if protocol is None else check.protocols[protocol].state
        if current is not SlotState.REJECTED:
            what = "protocol version out of range" if protocol is None else "cipher or length"
            self._decide(slot, protocol, SlotState.REJECTED,
                         f"{implausible} implausible reads, e.g. {what}")

    def _decide(self, slot: int, protocol: str | None, state: SlotState, reason: str) -> None:
        check = self.slots[slot]
        for each in PROTOCOLS if protocol is None else (protocol,):
            check.protocols[each].state = state
        check.reason = reason
        for listener in self.listeners:
            listener(slot, check)
