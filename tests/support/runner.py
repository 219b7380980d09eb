"""Run keytap (or a baseline capturer) in a lab namespace and wait until it is attached."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from keytap import READY_LINE
from keytap.demo.labnet import Lab


def keytap_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "keytap", *args]


class KeytapProcess:
    """keytap as a user runs it: a process, its stderr, its exit code."""

    def __init__(self, lab: Lab, ns: str, args: Sequence[str],
                 prefix: Sequence[str] = ()) -> None:
        """`prefix`: a command keytap runs under (e.g. unshare, for another PID namespace)."""
        self.lab, self.ns, self.args, self.prefix = lab, ns, list(args), list(prefix)
        self.process: subprocess.Popen | None = None
        self.stderr = ""  # what was read of keytap's stderr
        self._unread: list[str] = []  # lines read from the pipe, not yet looked at by wait_for
        self._partial = ""  # the start of a line not complete yet

    def start(self, timeout_s: float = 60, **popen) -> KeytapProcess:
        """Start and wait for the 'capturing on' line, i.e. until the filters are attached."""
        popen.setdefault("stdout", subprocess.DEVNULL)
        self.process = subprocess.Popen(
            self.lab.command(self.ns, *self.prefix, *keytap_command(*self.args)),
            stderr=subprocess.PIPE,
            text=True, start_new_session=True, **popen)
        self.wait_for(READY_LINE, timeout_s)
        return self

    def wait_for(self, text: str, timeout_s: float = 30) -> None:
        """Read keytap's stderr until a line contains `text`; the lines after it stay for the
        next wait. Raw reads: a buffered readline() would keep lines that came in one chunk
        where select() cannot see them, and wait for them in vain."""
        assert self.process is not None and self.process.stderr is not None
        fd = self.process.stderr.fileno()
        deadline = time.monotonic() + timeout_s
        while True:
            while self._unread:
                line = self._unread.pop(0)
                self.stderr += line
                if text in line:
                    return
            if time.monotonic() >= deadline:
                break
            if not select.select([fd], [], [], 0.5)[0]:
                continue
            chunk = os.read(fd, 65536).decode(errors="replace")
            if not chunk:  # the end of its stderr: it is exiting
                if self.process.poll() is not None:
                    code = self.process.returncode
                    raise AssertionError(f"keytap exited with {code}:\n{self.stderr}"
                                         f"{self._partial}")
                time.sleep(0.05)
                continue
            lines = (self._partial + chunk).split("\n")
            self._partial = lines.pop()
            self._unread += [f"{line}\n" for line in lines]
        raise AssertionError(f"keytap did not say {text!r} in {timeout_s}s:\n{self.stderr}")

    def _rest(self, rest: str) -> str:
        """What wait_for read but did not consume, then `rest`."""
        unread, self._unread, partial, self._partial = self._unread, [], self._partial, ""
        return "".join(unread) + partial + rest

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60) -> int:
        """Signal keytap like a user would, and collect its stderr and exit code."""
        assert self.process is not None
        self.process.send_signal(sig)
        _, rest = self.process.communicate(timeout=timeout_s)
        self.stderr += self._rest(rest)
        return self.process.returncode

    def wait(self, timeout_s: float = 120) -> int:
        assert self.process is not None
        _, rest = self.process.communicate(timeout=timeout_s)
        self.stderr += self._rest(rest)
        return self.process.returncode

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()
