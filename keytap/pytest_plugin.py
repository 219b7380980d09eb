"""pytest plugin: record a test session's packets and TLS secrets with keytap, test by test.

    sudo .venv/bin/python -m pytest --keytap capture.pcapng [--keytap-iface lo ...]

keytap runs beside the session as a subprocess, started before the first test and stopped
after the last, and every test is bracketed by two markers in the file, `start <nodeid>` and
`end <nodeid> <outcome>`, so that a failed test's traffic is found in Wireshark with
`frame.comment contains "<nodeid>"`: the packets between its two markers.

Registered through the `pytest11` entry point, so every pytest run of an environment with
keytap installed loads this module. Without --keytap it adds its options and nothing else: no
per-test hook is registered, and keytap's capture code (and BCC) is never imported here at
all, because the capture runs in its own process.

With pytest-xdist, only the controller runs keytap; it receives the workers' test reports a
little after the fact, so markers can come slightly late around a test's first packets.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from keytap import READY_LINE

START_TIMEOUT_S = 180.0  # BCC compiles the BPF programs first: seconds, more on a cold runner
STOP_TIMEOUT_S = 120.0  # keytap drains its rings and TLS flows still waiting for keys
MARKER_TIMEOUT_S = 5.0  # a marker send blocks only if keytap stopped reading its socket
PR_SET_PDEATHSIG = 1


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("keytap", "keytap: capture packets and TLS secrets (needs root)")
    group.addoption("--keytap", metavar="FILE",
                    help="capture the session's packets and TLS secrets into this pcapng file, "
                         "with a marker before and after each test")
    group.addoption("--keytap-iface", metavar="IFACE", action="append", default=[],
                    help="interface to capture (repeatable; default lo)")
    group.addoption("--keytap-summary-json", metavar="FILE",
                    help="write keytap's end-of-capture summary here as JSON")
    group.addoption("--keytap-fail-on-undecryptable", action="store_true",
                    help="fail the session when keytap saw a TLS session it has no keys for")


def pytest_configure(config: pytest.Config) -> None:
    """Register the per-test hooks only when asked to capture: otherwise zero overhead."""
    output = config.getoption("keytap")
    if output is None or hasattr(config, "workerinput"):  # xdist worker: controller captures
        return
    if output == "-":
        raise pytest.UsageError("--keytap needs a file name: the capture cannot go to stdout, "
                                "which is pytest's")
    config.pluginmanager.register(KeytapSession(config, output), "keytap-session")


class KeytapSession:
    """keytap as a subprocess of the session, and the markers sent to its socket."""

    def __init__(self, config: pytest.Config, output: str) -> None:
        self.config = config
        self.output = output
        self.interfaces: list[str] = config.getoption("keytap_iface") or ["lo"]
        self.summary_json: str | None = config.getoption("keytap_summary_json")
        self.fail_on_undecryptable: bool = config.getoption("keytap_fail_on_undecryptable")
        self.process: subprocess.Popen[str] | None = None
        self.exit_code: int | None = None
        self.problems: list[str] = []
        self.lines: list[str] = []  # keytap's stderr, for the terminal summary
        self._directory: Path | None = None
        self._socket_path = ""
        self._socket: socket.socket | None = None
        self._ready_line = ""
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self._reports: dict[str, list[pytest.TestReport]] = {}

    # --- session ---------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Attach before the first test (and its fixtures) can make a connection."""
        if os.geteuid() != 0:
            raise pytest.UsageError(
                "--keytap needs root (BPF programs, TC filters, uprobes): run pytest with sudo, "
                "e.g. sudo .venv/bin/python -m pytest --keytap capture.pcapng")
        self._directory = Path(tempfile.mkdtemp(prefix="keytap-pytest-"))
        self._socket_path = str(self._directory / "markers.sock")
        self._start()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.settimeout(MARKER_TIMEOUT_S)

    def pytest_report_header(self, config: pytest.Config) -> str:
        return self._ready_line

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Stop once every fixture is torn down; a capture that went wrong fails the run."""
        self._stop()
        if self.exit_code is not None and self.exit_code < 0:
            self.problems.append(f"keytap was killed by signal {-self.exit_code}: the file may "
                                 "be incomplete")
        elif self.exit_code != 0:
            self.problems.append(f"keytap exited with {self.exit_code}")
        if self.problems and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.write_sep("-", f"keytap: {self.output}")
        for line in self.lines:
            terminalreporter.write_line(line)
        for problem in self.problems:
            terminalreporter.write_line(f"keytap: {problem}", red=True, bold=True)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """Last resort (the session never finished): keytap must not outlive pytest."""
        self._stop()
        if self._socket is not None:
            self._socket.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    # --- tests -----------------------------------------------------------------------------

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._reports[nodeid] = []
        self._mark(f"start {nodeid}")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._reports.setdefault(report.nodeid, []).append(report)

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self._mark(f"end {nodeid} {outcome(self._reports.pop(nodeid, []))}")

    # --- keytap ----------------------------------------------------------------------------

    def _start(self) -> None:
        command = [sys.executable, "-m", "keytap", "capture", "-o", self.output,
                   "--marker-socket", self._socket_path]
        for interface in self.interfaces:
            command += ["-i", interface]
        if self.summary_json:
            command += ["--summary-json", self.summary_json]
        if self.fail_on_undecryptable:
            command.append("--fail-on-undecryptable")
        # its own session: a Ctrl-C at the terminal reaches pytest only, which then still
        # tears down (traffic worth having) before it stops keytap itself
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, errors="replace", start_new_session=True,
            preexec_fn=_signal_when_parent_dies())
        self._reader = threading.Thread(target=self._read_stderr, name="keytap-stderr",
                                        daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._stop()
                said = "\n".join(self.lines) or "(nothing on stderr)"
                raise pytest.UsageError(
                    f"keytap did not start capturing (exit code {self.exit_code}):\n{said}")

    def _read_stderr(self) -> None:
        """Drain keytap's stderr all along, so that a full pipe never blocks it."""
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            line = line.rstrip("\n")
            self.lines.append(line)
            if not self._ready.is_set() and READY_LINE in line:
                self._ready_line = line
                self._ready.set()

    def _mark(self, text: str) -> None:
        """One datagram; its CLOCK_MONOTONIC time places it among the captured packets."""
        if self._socket is None or self.exit_code is not None:
            return
        try:
            self._socket.sendto(f"{time.monotonic_ns()} {text}".encode(), self._socket_path)
        except OSError as error:
            if not self.problems:  # one line is enough: the rest would say the same
                self.problems.append(f"marker {text!r} not delivered: {error}")

    def _stop(self) -> None:
        if self.process is None or self.exit_code is not None:
            return
        if self.process.poll() is not None:
            self.problems.append("keytap stopped before the session ended")
        else:
            self.process.send_signal(signal.SIGINT)
        try:
            self.exit_code = self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait()
            self.problems.append(f"keytap did not stop within {STOP_TIMEOUT_S:.0f}s of SIGINT: "
                                 "killed, the file may be incomplete")
        if self._reader is not None:
            self._reader.join(timeout=5)


def outcome(reports: list[pytest.TestReport]) -> str:
    """One word per test, as pytest's summary would count it."""
    for report in reports:
        if report.failed:
            return "failed" if report.when == "call" else "error"
    for report in reports:
        if report.skipped:
            return "xfailed" if hasattr(report, "wasxfail") else "skipped"
    if any(report.when == "call" and hasattr(report, "wasxfail") for report in reports):
        return "xpassed"
    return "passed" if reports else "unknown"


def _signal_when_parent_dies() -> Callable[[], None]:
    """Before exec, in the child: SIGINT keytap if pytest is killed outright (a CI timeout's
    SIGKILL) so that it never goes on capturing with nobody to stop it."""
    import ctypes  # only with --keytap

    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not import anything
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT)
        if os.getppid() != parent:  # pytest died before prctl took effect
            os.kill(os.getpid(), signal.SIGINT)

    return preexec
