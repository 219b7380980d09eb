"""tls.selfcheck: which slots' keys may be written, from proofs, refutations and counts."""

from __future__ import annotations

from keytap.tls.selfcheck import SELF_CHECK_FAILURES, SelfCheck, SlotCheck, SlotState


def check_with(*builds: str) -> tuple[SelfCheck, list[tuple[int, SlotState, str]]]:
    check = SelfCheck()
    verdicts: list[tuple[int, SlotState, str]] = []
    check.listeners.append(lambda slot, c: verdicts.append((slot, c.state, c.reason)))
    for slot, build in enumerate(builds):
        check.add(slot, build)
    return check, verdicts


def test_a_proven_candidate_rejects_its_siblings_only() -> None:
    check, verdicts = check_with("a", "a", "b")
    check.verified(1)
    assert [check.state(s) for s in range(3)] == [
        SlotState.REJECTED, SlotState.PROVEN, SlotState.CANDIDATE]
    assert [v[:2] for v in verdicts] == [(1, SlotState.PROVEN), (0, SlotState.REJECTED)]


def test_one_refutation_rejects_a_candidate_but_not_a_proven_slot() -> None:
    check, _ = check_with("a", "b")
    check.failed(0)
    assert check.state(0) is SlotState.REJECTED
    check.verified(1)
    for _ in range(SELF_CHECK_FAILURES - 1):
        check.failed(1)
    assert check.state(1) is SlotState.PROVEN
    check.verified(1)  # a success in between starts the count again
    for _ in range(SELF_CHECK_FAILURES):
        check.failed(1)
    assert check.state(1) is SlotState.REJECTED


def test_contradictions_reject_only_an_unproven_candidate() -> None:
    check, _ = check_with("a", "b")
    check.verified(1)
    for _ in range(SELF_CHECK_FAILURES):
        check.contradicted(0)
        check.contradicted(1)
    assert check.state(0) is SlotState.REJECTED and check.state(1) is SlotState.PROVEN


def test_implausible_reads_reject_unless_some_read_was_plausible() -> None:
    check, _ = check_with("a", "b")
    check.implausible(0, SELF_CHECK_FAILURES, plausible=1)
    check.implausible(1, SELF_CHECK_FAILURES, plausible=0)
    assert check.state(0) is SlotState.CANDIDATE and check.state(1) is SlotState.REJECTED


def test_remembered_slots_start_proven_and_unknown_slots_are_rejected() -> None:
    check = SelfCheck()
    check.add(4, "a", proven=True)
    assert check.state(4) is SlotState.PROVEN and check.state(5) is SlotState.REJECTED
    assert isinstance(check.slots[4], SlotCheck)
