"""tls.checker: a child process answers as the capture loop's own proof would, never blocks the
loop, sheds beyond its bound, and is accounted for (CPU time, an end that loses no answer)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from keytap.tls import checker as checker_module
from keytap.tls.checker import InlineChecker, ProcessChecker
from keytap.tls.proof import judged, prove
from tests.unit.test_proof import all_vectors, replace_secret


@pytest.fixture(scope="module")
def checker() -> Iterator[ProcessChecker]:
    """One child for the module: starting one costs a Python and its imports."""
    started = ProcessChecker(max_outstanding=8)
    yield started
    started.close()


OPEN = (False, False)  # neither side has closed


def test_its_answers_are_the_proofs_own(checker: ProcessChecker) -> None:
    sessions = [(v["client_records"], v["server_records"], v["lines"]) for v in all_vectors()]
    first = all_vectors()[0]
    wrong = replace_secret(first["lines"], "SERVER_HANDSHAKE_TRAFFIC_SECRET", bytes(48))
    sessions.append((first["client_records"], first["server_records"], wrong))
    expected, answers = {}, {}
    for i in range(0, len(sessions), 8):  # within its bound of unanswered jobs
        for client, server, lines in sessions[i:i + 8]:
            ticket = checker.submit(client, server, lines, OPEN)
            expected[ticket] = judged(prove(client, server, lines), lines, OPEN)
        answers |= {ticket: (refuted, kept) for ticket, refuted, kept in checker.collect(True)}
    assert answers == expected and checker.runs == len(sessions)
    assert sum(refuted for refuted, _ in answers.values()) == 1  # the wrong secret's
    assert sum(bool(kept) for _, kept in answers.values()) == len(sessions) - 1
    assert checker.cpu_ns > 0 and checker.cpu_s > 0


def test_beyond_its_bound_a_job_is_refused_not_queued(checker: ProcessChecker) -> None:
    v = all_vectors()[0]
    os.kill(checker.pid, signal.SIGSTOP)  # a checker that gets no CPU at all
    try:
        tickets = [checker.submit(v["client_records"], v["server_records"], v["lines"], OPEN)
                   for _ in range(10)]
        assert tickets[8:] == [None, None] and None not in tickets[:8]
        assert checker.busy is False  # from 64 unanswered on, by default
        assert checker.collect() == []  # never waits unless told
    finally:
        os.kill(checker.pid, signal.SIGCONT)
    assert {ticket for ticket, _, _ in checker.collect(wait=True)} == set(tickets[:8])


def test_a_checker_whose_child_dies_answers_undecided_then_checks_inline() -> None:
    gone = ProcessChecker()
    v = all_vectors()[0]
    os.kill(gone.pid, signal.SIGKILL)
    ticket = gone.submit(v["client_records"], v["server_records"], v["lines"], OPEN)
    assert gone.collect(wait=True) == [(ticket, False, ())]  # its job was lost with it
    assert gone.broken is not None
    later = gone.submit(v["client_records"], v["server_records"], v["lines"], OPEN)
    [(answered, refuted, kept)] = gone.collect()
    assert later == answered > ticket and not refuted and kept and gone.runs == 1
    gone.close()


def test_the_inline_checker_answers_at_once() -> None:
    v = all_vectors()[0]
    inline = InlineChecker()
    ticket = inline.submit(v["client_records"], v["server_records"], v["lines"], OPEN)
    [(answered, refuted, kept)] = inline.collect()
    assert answered == ticket and not refuted and kept and inline.runs == 1


def test_the_answer_pipe_is_read_at_most_every_poll_interval(
        checker: ProcessChecker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read of an empty pipe at every loop turn was most of what the checker cost the loop."""
    now = [time.monotonic_ns() + 10**12]  # a clock of the test's own, past the checker's
    monkeypatch.setattr(checker_module, "time", SimpleNamespace(
        monotonic_ns=lambda: now[0], thread_time_ns=time.thread_time_ns))
    reads, real_read = [], os.read

    def read(fd: int, size: int) -> bytes:
        reads.append(fd)
        return real_read(fd, size)

    monkeypatch.setattr(checker_module.os, "read", read)
    v = all_vectors()[0]
    ticket = checker.submit(v["client_records"], v["server_records"], v["lines"], OPEN)
    os.kill(checker.pid, signal.SIGSTOP)  # its answer is not there before the test says so
    try:
        assert checker.collect() == []  # the job leaves; the pipe is looked at once
        polled = len(reads)
        assert polled >= 1
        for _ in range(50):  # loop turns within the same interval
            assert checker.collect() == []
        assert len(reads) == polled
        now[0] += checker_module.POLL_INTERVAL_NS
        assert checker.collect() == [] and len(reads) > polled
    finally:
        os.kill(checker.pid, signal.SIGCONT)
    assert [answer[0] for answer in checker.collect(wait=True)] == [ticket]
