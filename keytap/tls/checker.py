"""Where a proven layout's sessions are checked: a process of their own, at idle priority.

Checking a session against its records (tls.proof) costs ~100-180 us of CPU, as much as all
the rest keytap does for it. In the capture loop that time is taken from the CPUs the pod
runs on. A child process under SCHED_IDLE runs only on CPU time nothing else wants: the pod
loses nothing measurable, and its sessions are checked a few milliseconds later. A node whose
CPUs are all busy gets them checked late, and past `max_outstanding` not at all (counted
"unchecked"), rather than its pods slowed. Why the capture loop keeps proving candidate layouts
itself, and how the reorder buffer waits for answers: docs/DESIGN.md, "Session checks".

The child is this module run with `-m`: it reads jobs from one pipe and writes verdicts to
another, each a pickle behind a 4-byte length (the pipes carry only the two processes' own
data). It ignores SIGINT and SIGTERM and ends at end of file, so a capture stopped by a signal
still hears every answer, and one killed outright takes its checker with it. multiprocessing
would do the same with more machinery: a forked child would share BCC's and LLVM's memory for
no use, and its queues block or grow without bound where this one sheds.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from keytap.tls.proof import SessionProof, judged, prove
from keytap.tls.records import TlsRecord

_LENGTH = struct.Struct("!I")
# Jobs leave in batches: a write to the child's empty pipe wakes it, an IPI on a VM's other
# CPU (~20 us, which the capture loop pays). At most this late, or once this many bytes wait.
SEND_INTERVAL_NS = 10_000_000
SEND_BYTES = 64 * 1024
# Answers are looked for at most this often: a read of an empty pipe is a syscall the loop
# would pay at every turn, and an answer a few milliseconds late still comes well within the
# reorder window.
POLL_INTERVAL_NS = 2_000_000
PIPE_BYTES = 1 << 20  # each pipe's capacity: a starved child's jobs wait in the kernel
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: keytap killed outright takes its checker with it
# (ticket, whether the records refute the lines, the indices of the lines they prove)
Answer = tuple[int, bool, tuple[int, ...]]


class InlineChecker:
    """Checks each session when it is submitted, in the caller's thread (tests, and where no
    checker process can run)."""

    def __init__(self, prover: Callable[..., SessionProof] = prove,
                 tickets_from: int = 0) -> None:
        self._prove = prover  # prove's signature (the last argument, a memo, is None)
        self._answers: list[Answer] = []
        self._tickets = tickets_from
        self.runs = 0
        self.cpu_ns = 0

    @property
    def busy(self) -> bool:
        return False

    def submit(self, client: Sequence[TlsRecord], server: Sequence[TlsRecord],
               lines: Sequence[str], finished: tuple[bool, bool]) -> int | None:
        self._tickets += 1
        started = time.thread_time_ns()
        proof = self._prove(client, server, lines, None)
        self._answers.append((self._tickets, *judged(proof, lines, finished)))
        self.cpu_ns += time.thread_time_ns() - started
        self.runs += 1
        return self._tickets

    def collect(self, wait: bool = False) -> list[Answer]:
        answers, self._answers = self._answers, []
        return answers


class ProcessChecker:
    """Checks sessions in a child process at SCHED_IDLE; answers come back through `collect`.

    Nothing here blocks the capture loop: jobs go out as the pipe takes them, and a job beyond
    `max_outstanding` unanswered ones, or `max_queued_bytes` not yet taken by the pipe, is
    refused (`submit` returns None). Should the child end, each job it had is answered
    "undecided", and later ones are checked in the caller's thread (an InlineChecker).
    """

    def __init__(self, max_outstanding: int = 2048, busy_at: int = 64,
                 max_queued_bytes: int = 16 << 20) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root,
                                                          env.get("PYTHONPATH"))))
        # Pipes of their own, not its stdin and stdout: nothing the interpreter or a
        # sitecustomize prints can get into them, and keytap's stdout may be the capture.
        jobs, self._to_child = os.pipe()
        self._from_child, answers = os.pipe()
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "keytap.tls.checker", str(os.getpid()), str(jobs),
                 str(answers)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                pass_fds=(jobs, answers))
        except OSError:
            os.close(self._to_child)
            os.close(self._from_child)
            raise
        finally:
            os.close(jobs)
            os.close(answers)
        with contextlib.suppress(OSError):  # its imports too (it sets it itself otherwise)
            os.sched_setscheduler(self._child.pid, os.SCHED_IDLE, os.sched_param(0))
        for fd in (self._to_child, self._from_child):
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):  # above pipe-max-size: the default 64 KiB
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._out = bytearray()
        self._sent_ns = 0  # when `_out` last went to the pipe (or the pipe was full)
        self._polled_ns = 0  # when answers were last looked for
        self._pipe_took_all = True  # at the last send
        self._in = bytearray()
        self._tickets = 0
        self._unanswered: set[int] = set()
        self._max_outstanding = max_outstanding
        self._max_queued_bytes = max_queued_bytes  # not yet in the pipe (bulk sessions' jobs
        # carry up to 64 KiB of records each)
        self._busy_at = busy_at
        self.broken: str | None = None  # why the child is gone, if it went before `close`
        self._inline: InlineChecker | None = None  # what checks once it is gone
        self._final_cpu_s: float | None = None
        self._runs = 0
        self._cpu_ns = 0  # the child's CPU time on the answered jobs

    @property
    def runs(self) -> int:
        return self._runs + (self._inline.runs if self._inline is not None else 0)

    @property
    def cpu_ns(self) -> int:
        return self._cpu_ns + (self._inline.cpu_ns if self._inline is not None else 0)

    @property
    def pid(self) -> int:
        return self._child.pid

    @property
    def busy(self) -> bool:
        """Answers are falling behind: a key waiting on one would hold its flow for long."""
        return len(self._unanswered) >= self._busy_at

    def submit(self, client: Sequence[TlsRecord], server: Sequence[TlsRecord],
               lines: Sequence[str], finished: tuple[bool, bool]) -> int | None:
        """A ticket for the answer, or None: not taken (too many unanswered). The job leaves
        with others, within SEND_INTERVAL_NS (see `collect`)."""
        if self._inline is not None:
            return self._inline.submit(client, server, lines, finished)
        if (len(self._unanswered) >= self._max_outstanding
                or len(self._out) >= self._max_queued_bytes):
            return None
        self._tickets += 1
        job = pickle.dumps((self._tickets, _flat(client), _flat(server), lines, finished),
                           pickle.HIGHEST_PROTOCOL)
        self._out += _LENGTH.pack(len(job))
        self._out += job
        self._unanswered.add(self._tickets)
        return self._tickets

    def collect(self, wait: bool = False) -> list[Answer]:
        """The answers come so far; with `wait`, every one outstanding (the child is given a
        normal priority for that, where keytap may: the capture is ending)."""
        if self._inline is not None:
            return self._inline.collect()
        if wait and self._unanswered:
            _raise_priority(self._child.pid)
        answers: list[Answer] = []
        now = time.monotonic_ns()
        if self._out and (wait or now - self._sent_ns >= SEND_INTERVAL_NS
                          or (len(self._out) >= SEND_BYTES and self._pipe_took_all)):
            self._sent_ns = now
            self._send()
        if not wait and now - self._polled_ns < POLL_INTERVAL_NS:
            return answers
        self._polled_ns = now
        while True:
            self._receive(answers)
            if self.broken is not None:  # what it had will never be answered: undecided
                answers += [(ticket, False, ()) for ticket in sorted(self._unanswered)]
                self._unanswered.clear()
                self._inline = InlineChecker(tickets_from=self._tickets)
                return answers
            if not (wait and self._unanswered):
                return answers
            select.select([self._from_child], [self._to_child] if self._out else [], [])
            self._send()

    @property
    def cpu_s(self) -> float:
        """The child's CPU time (user + system) so far, all of it: imports, pickles, proofs."""
        if self._final_cpu_s is not None:
            return self._final_cpu_s
        try:
            fields = Path(f"/proc/{self._child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def close(self) -> None:
        """End the child (it ends at end of file; killed if it does not within a second)."""
        os.close(self._to_child)
        os.close(self._from_child)
        pid = self._child.pid
        deadline = time.monotonic() + 1
        while (ended := os.wait4(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if ended[0] == 0:
            self._child.kill()
            ended = os.wait4(pid, 0)
        self._child.returncode = ended[1]  # reaped here, for its rusage
        usage = ended[2]
        self._final_cpu_s = usage.ru_utime + usage.ru_stime

    def _send(self) -> None:
        """As much of `_out` as the pipe takes (`_pipe_took_all` says whether it took all:
        if not, the next try waits for SEND_INTERVAL_NS)."""
        self._pipe_took_all = False
        while self._out and self.broken is None:
            try:
                sent = os.write(self._to_child, self._out)
            except BlockingIOError:
                return
            except OSError as error:
                self._lost(f"cannot write to it: {error.strerror}")
                return
            del self._out[:sent]
        self._pipe_took_all = True

    def _receive(self, answers: list[Answer]) -> None:
        while self.broken is None and self._unanswered:
            try:
                chunk = os.read(self._from_child, 1 << 16)  # (allocated whole at each call)
            except BlockingIOError:
                break
            if not chunk:
                self._lost("it ended")
                break
            self._in += chunk
        data = self._in
        while len(data) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(data)
            if len(data) < _LENGTH.size + length:
                break
            ticket, refuted, kept, cpu_ns = pickle.loads(data[_LENGTH.size:_LENGTH.size + length])
            del data[:_LENGTH.size + length]
            self._unanswered.discard(ticket)
            self._runs += 1
            self._cpu_ns += cpu_ns
            answers.append((ticket, refuted, kept))

    def _lost(self, why: str) -> None:
        self.broken = why
        self._out.clear()


def _flat(records: Sequence[TlsRecord]) -> list:
    """Records as one list of their fields: pickled in C alone (a NamedTuple calls back into
    Python for each one)."""
    return [field for record in records for field in record]


def _records(flat: list) -> list[TlsRecord]:
    return [TlsRecord(*flat[i:i + 3]) for i in range(0, len(flat), 3)]


def _raise_priority(pid: int) -> None:
    with contextlib.suppress(OSError):  # not allowed (not root): it finishes at idle priority
        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))


def _serve(jobs: int, answers: int) -> None:
    """The child: prove each job, answer with the verdicts and the CPU time they took."""
    read = os.fdopen(jobs, "rb", buffering=1 << 16)
    while header := read.read(_LENGTH.size):
        (length,) = _LENGTH.unpack(header)
        ticket, client, server, lines, finished = pickle.loads(read.read(length))
        started = time.thread_time_ns()
        proof = prove(_records(client), _records(server), lines)
        refuted, kept = judged(proof, lines, finished)
        answer = pickle.dumps((ticket, refuted, kept, time.thread_time_ns() - started),
                              pickle.HIGHEST_PROTOCOL)
        frame = memoryview(_LENGTH.pack(len(answer)) + answer)
        while frame:
            frame = frame[os.write(answers, frame):]


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the capture ends it, once it has its answers
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(sys.argv[1]):
        return  # keytap went before the line above: nothing will come
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        os.nice(19)
    _serve(int(sys.argv[2]), int(sys.argv[3]))


if __name__ == "__main__":
    main()
