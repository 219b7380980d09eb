"""The self-check: which layout slots' keys may reach the file, decided from what the wire shows.

A slot (one layout, read in the kernel for one OpenSSL build) starts as a CANDIDATE unless the
same build's layout was proven in an earlier capture. Its keys are written only once it is
PROVEN: one session's secrets decrypted that session's own records, every tag or MAC
verifying (tls.proof, run by the reorder buffer). Facts come in from two sides:

- the reorder buffer: a session verified or failed, a key event dropped while ClientHellos of
  the same moments went without keys (a contradiction);
- the key source: per-slot counts of implausible reads.

A candidate that fails once (a record that does not decrypt under its secrets is proof it reads
the wrong memory), reads only implausible values, or is contradicted SELF_CHECK_FAILURES times
is REJECTED; when one candidate of a build is proven, its siblings are rejected too. A proven
slot whose sessions start failing is switched off. Every verdict goes to the listeners
(tls.probes: switch the slot off in the kernel, load the next candidate, tell the user).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

SELF_CHECK_FAILURES = 3


class SlotState(enum.Enum):
    CANDIDATE = "candidate"  # keys wait for a proof
    PROVEN = "proven"  # keys are written (and each session is still verified)
    REJECTED = "rejected"  # keys are dropped; the kernel no longer reads with it


@dataclass
class SlotCheck:
    """What is known about one slot."""

    build: str  # the OpenSSL build it reads (siblings share it)
    state: SlotState
    verified: int = 0  # sessions whose secrets decrypted their records
    failed: int = 0  # sessions whose records did not decrypt
    failed_in_a_row: int = 0
    contradicted: int = 0
    reason: str = ""


Verdict = Callable[[int, SlotCheck], None]


class SelfCheck:
    """Holds every slot's state; the reorder buffer asks `state(slot)` for each key event."""

    def __init__(self) -> None:
        self.listeners: list[Verdict] = []
        self.slots: dict[int, SlotCheck] = {}

    def add(self, slot: int, build: str, proven: bool = False) -> None:
        self.slots[slot] = SlotCheck(build, SlotState.PROVEN if proven else SlotState.CANDIDATE)

    def state(self, slot: int) -> SlotState:
        check = self.slots.get(slot)
        return check.state if check is not None else SlotState.REJECTED

    # reports from the reorder buffer ---------------------------------------------------------

    def verified(self, slot: int) -> None:
        check = self.slots.get(slot)
        if check is None:
            return
        check.verified += 1
        check.failed_in_a_row = 0
        if check.state is SlotState.CANDIDATE:
            self._decide(slot, SlotState.PROVEN, "a session's records decrypted under its keys")
            for sibling, other in self.slots.items():
                if other.build == check.build and other.state is SlotState.CANDIDATE:
                    self._decide(sibling, SlotState.REJECTED, f"slot {slot} was proven instead")

    def failed(self, slot: int) -> None:
        check = self.slots.get(slot)
        if check is None:
            return
        check.failed += 1
        check.failed_in_a_row += 1
        if check.state is SlotState.CANDIDATE:
            self._decide(slot, SlotState.REJECTED, "a session's records did not decrypt under "
                                                   "the secrets it read")
        elif (check.state is SlotState.PROVEN
              and check.failed_in_a_row >= SELF_CHECK_FAILURES):
            self._decide(slot, SlotState.REJECTED, f"{check.failed_in_a_row} sessions in a row "
                                                   "did not decrypt under the secrets it read")

    def contradicted(self, slot: int) -> None:
        check = self.slots.get(slot)
        if check is None:
            return
        check.contradicted += 1
        if (check.state is SlotState.CANDIDATE and not check.verified
                and check.contradicted >= SELF_CHECK_FAILURES):
            self._decide(slot, SlotState.REJECTED, f"the client randoms of {check.contradicted} "
                                                   "handshakes were in no ClientHello on the wire")

    # reports from the key source -------------------------------------------------------------

    def implausible(self, slot: int, implausible: int, plausible: int) -> None:
        check = self.slots.get(slot)
        if (check is not None and check.state is not SlotState.REJECTED and not plausible
                and implausible >= SELF_CHECK_FAILURES):
            self._decide(slot, SlotState.REJECTED, f"{implausible} implausible reads, e.g. "
                                                   "protocol version out of range")

    def _decide(self, slot: int, state: SlotState, reason: str) -> None:
        check = self.slots[slot]
        check.state = state
        check.reason = reason
        for listener in self.listeners:
            listener(slot, check)
