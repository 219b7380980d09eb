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


def test_a_proven_candidate_rejects_its_siblings_only_for_that_protocol() -> None:
    check, verdicts = check_with("a", "a", "b")
    check.verified(1, "1.3")
    assert [check.state(s, "1.3") for s in range(3)] == [
        SlotState.REJECTED, SlotState.PROVEN, SlotState.CANDIDATE]
    assert check.state(1, "1.2") is check.state(0, "1.2") is SlotState.CANDIDATE
    assert [v[:2] for v in verdicts] == [(1, SlotState.PROVEN), (0, SlotState.CANDIDATE)]
    check.verified(1, "1.2")
    assert check.state(0) is SlotState.REJECTED  # now for both: the slot is switched off
    assert verdicts[-1][:2] == (0, SlotState.REJECTED)


def test_a_listener_may_add_slots_while_siblings_are_rejected() -> None:
    """The probes load the next candidates when a sibling is rejected: slots are added while
    the siblings of a proven slot are being decided (a capture crashed on it)."""
    check, _ = check_with("a", "a", "a")
    check.listeners.append(lambda slot, c: c.state is SlotState.REJECTED
                           and check.add(len(check.slots), "a"))
    check.verified(2, "1.2")
    check.verified(2, "1.3")
    assert [check.state(s) for s in range(3)] == [SlotState.REJECTED, SlotState.REJECTED,
                                                  SlotState.PROVEN]
    assert len(check.slots) > 3


def test_a_layout_right_for_tls12_is_not_trusted_for_tls13() -> None:
    check, _ = check_with("a")
    check.verified(0, "1.2")
    assert check.state(0, "1.2") is SlotState.PROVEN
    assert check.state(0, "1.3") is SlotState.CANDIDATE
    check.failed(0, "1.3")
    assert check.state(0, "1.3") is SlotState.REJECTED and check.state(0) is SlotState.PROVEN


def test_one_refutation_rejects_a_candidate_but_not_a_proven_slot() -> None:
    check, _ = check_with("a", "b")
    check.failed(0, "1.3")
    assert check.state(0, "1.3") is SlotState.REJECTED
    check.verified(1, "1.3")
    for _ in range(SELF_CHECK_FAILURES - 1):
        check.failed(1, "1.3")
    assert check.state(1, "1.3") is SlotState.PROVEN
    check.verified(1, "1.3")  # a success in between starts the count again
    for _ in range(SELF_CHECK_FAILURES):
        check.failed(1, "1.3")
    assert check.state(1, "1.3") is SlotState.REJECTED


def test_contradictions_reject_only_an_unproven_candidate() -> None:
    check, _ = check_with("a", "b")
    check.verified(1, "1.3")
    for _ in range(SELF_CHECK_FAILURES):
        check.contradicted(0, "1.3")
        check.contradicted(1, "1.3")
    assert check.state(0, "1.3") is SlotState.REJECTED
    assert check.state(1, "1.3") is SlotState.PROVEN


def test_implausible_reads_reject_unless_some_read_was_plausible() -> None:
    check, _ = check_with("a", "b", "c")
    check.implausible(0, None, SELF_CHECK_FAILURES, plausible=1)
    check.implausible(1, None, SELF_CHECK_FAILURES, plausible=0)
    assert check.state(0) is SlotState.CANDIDATE and check.state(1) is SlotState.REJECTED
    check.implausible(2, "1.3", SELF_CHECK_FAILURES, plausible=0)  # e.g. a garbage cipher
    assert check.state(2, "1.3") is SlotState.REJECTED
    assert check.state(2, "1.2") is SlotState.CANDIDATE


def test_remembered_slots_start_proven_and_unknown_slots_are_rejected() -> None:
    check = SelfCheck()
    check.add(4, "a", proven=("1.2", "1.3"))
    assert check.state(4) is SlotState.PROVEN and check.state(5) is SlotState.REJECTED
    assert isinstance(check.slots[4], SlotCheck)


def test_keys_left_unproven_by_their_own_records_reject_an_unproven_candidate() -> None:
    check, _ = check_with("a", "b")
    check.verified(1, "1.3")
    for _ in range(SELF_CHECK_FAILURES):
        check.unproven(0, "1.3")
        check.unproven(1, "1.3")
    assert check.state(0, "1.3") is SlotState.REJECTED
    assert check.state(1, "1.3") is SlotState.PROVEN
