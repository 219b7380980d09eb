"""Run keytap (or a baseline capturer) in a lab namespace and wait until it is attached."""

from __future__ import annotations

import contextlib
import selectors
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
        self.stderr = ""

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
        """Read keytap's stderr until a line contains `text`."""
        assert self.process is not None and self.process.stderr is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not selector.select(timeout=0.5):
                continue
            line = self.process.stderr.readline()
            self.stderr += line
            if text in line:
                return
            if not line and self.process.poll() is not None:
                code = self.process.returncode
                raise AssertionError(f"keytap exited with {code}:\n{self.stderr}")
        raise AssertionError(f"keytap did not say {text!r} in {timeout_s}s:\n{self.stderr}")

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60) -> int:
        """Signal keytap like a user would, and collect its stderr and exit code."""
        assert self.process is not None
        self.process.send_signal(sig)
        _, rest = self.process.communicate(timeout=timeout_s)
        self.stderr += rest
        return self.process.returncode

    def wait(self, timeout_s: float = 120) -> int:
        assert self.process is not None
        _, rest = self.process.communicate(timeout=timeout_s)
        self.stderr += rest
        return self.process.returncode

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()
