"""What the lab benchmarks in tools/ share: the lab's life, keytap and servers in it, tables.

Kept in one place so that every benchmark cleans up, reports and fails the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from keytap import READY_LINE
from keytap.demo.labnet import Lab, remove_stale_labs

REPO = Path(__file__).resolve().parents[1]  # `python -m keytap` runs from here: this checkout
sys.path.insert(0, str(REPO))  # tests.support: the lab's peers and certificates
from tests.support.tls_lab import make_certificate  # noqa: E402

STOP_TIMEOUT_S = 120.0


@dataclass(kw_only=True)
class Run:
    """What every benchmark's result has: why it failed, if it did (the rest of its row)."""

    error: str | None = None


R = TypeVar("R", bound=Run)


class Interrupted(Exception):
    """SIGTERM or SIGHUP: unwind through every finally like Ctrl-C does."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def ignore_signals() -> None:
    """Nothing may interrupt the cleanup."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The script's docstring's first line as its --help description."""
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def add_dir_argument(parser: argparse.ArgumentParser) -> None:
    """--dir: capture files can be large, a user may want them off /tmp."""
    parser.add_argument("--dir", type=Path, help="where capture files go (default: a temp dir)")


def parse_tls_args(parser: argparse.ArgumentParser, versions: Iterable[str]) -> argparse.Namespace:
    """The TLS benchmarks' last options, --versions and --dir, then all parsed; args.versions
    a checked list."""
    parser.add_argument("--versions", default="1.3,1.2",
                        help="comma-separated TLS versions, from 1.3,1.2 (default both)")
    add_dir_argument(parser)
    args = parser.parse_args()
    args.versions = choices(parser, args.versions, versions, "version")
    return args


def choices(parser: argparse.ArgumentParser, text: str, known: Iterable[str],
            noun: str) -> list[str]:
    """A comma-separated option's items; exits through `parser` on none or an unknown one."""
    allowed = list(known)
    items = [item for item in text.split(",") if item]
    unknown = set(items) - set(allowed)
    if unknown or not items:
        parser.error(f"unknown {noun}(s) {sorted(unknown)}: choose from {allowed}")
    return items


def preflight(name: str, tools: Iterable[str]) -> None:
    """Exit with the reason before building a lab that could not work."""
    if os.geteuid() != 0:
        sys.exit(f"{name}: needs root (BPF, TC, network namespaces): run it with sudo")
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(f"{name}: {tool} is missing: run tools/setup")


def in_lab(name: str, parent: Path | None, body: Callable[[Lab, Path], None]) -> bool:
    """body(lab, temporary directory), then both removed even on a signal; True if interrupted.

    SIGTERM and SIGHUP unwind like Ctrl-C, so no namespace or process outlives the benchmark.
    """
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)
    lab = Lab()
    directory = Path(tempfile.mkdtemp(prefix="keytap-bench-", dir=parent))
    try:
        remove_stale_labs()
        lab.create()
        body(lab, directory)
    except (KeyboardInterrupt, Interrupted) as stopped:
        reason = str(stopped) or "SIGINT"
        print(f"{name}: interrupted ({reason}), cleaning up", file=sys.stderr)
        return True
    finally:
        ignore_signals()
        lab.destroy()  # SIGKILLs every process group spawned in the lab, deletes the netns
        shutil.rmtree(directory, ignore_errors=True)
    return False


def run(name: str, tools: Iterable[str], parent: Path | None,
        measure: Callable[[Lab, Path, list[R]], None], heading: str,
        report: Callable[[list[R]], str]) -> int:
    """A benchmark's main: check, measure(lab, directory, results) in a lab, then the heading
    and report(results) on stdout (even if interrupted, what was measured); the exit status:
    1 if a run failed."""
    preflight(name, tools)
    results: list[R] = []
    interrupted = in_lab(name, parent, lambda lab, directory: measure(lab, directory, results))
    if results:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())  # numbers mean little without it
        print(f"{heading}; {os.cpu_count()} CPUs, load average now {load}"
              f"{'; INTERRUPTED' if interrupted else ''}")
        print(report(results))
    if interrupted:
        return 130  # as for Ctrl-C
    return 1 if any(r.error for r in results) else 0


def interleaved(repeat: int, items: Collection[str],
                ways: Collection[str]) -> Iterator[tuple[int, str, str]]:
    """(round, item, way), every pair once a round: a drift in the machine's load hits every
    way alike."""
    for round_ in range(1, repeat + 1):
        for item in items:
            for way in ways:
                yield round_, item, way


def last_line(text: bytes | str) -> str:
    """The last non-blank line: the one that says why a tool failed."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def wait_for_text(process: subprocess.Popen, log: Path, needle: str, timeout_s: float) -> None:
    """Until the process's stderr (a file: a pipe nobody reads could block it) has `needle`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if needle in text:
            return
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {last_line(text)}")
        time.sleep(0.05)
    raise RuntimeError(f"not ready after {timeout_s:.0f}s: {last_line(log.read_text())}")


def spawn_keytap(lab: Lab, log: Path, *args: str, cpus: str | None = None,
                 **kwargs) -> subprocess.Popen:
    """keytap capture of this checkout on the pod's veth in the node namespace, stderr to `log`,
    on `cpus` if given (a CPU list).

    As on a Kubernetes node; `log` is a file since nobody reads a pipe while the load runs.
    """
    with log.open("w") as stderr:
        return lab.spawn(lab.node, *pinned(cpus, sys.executable, "-m", "keytap", "capture",
                                           "-i", lab.pod_veth, *args),
                         stderr=stderr, cwd=REPO, **kwargs)


def pinned(cpus: str | None, *command: str) -> tuple[str, ...]:
    """`command` run on the CPUs of the list `cpus` ("0", "0-1,3"), or anywhere when None;
    taskset execs the command, so its Popen's pid stays the command's."""
    return command if cpus is None else ("taskset", "--cpu-list", cpus, *command)


def cpu_list(text: str) -> set[int]:
    """The CPUs of a list as taskset takes them: "0", "0-1,3". ValueError if malformed."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def other_cpus(pod_cpus: str) -> str:
    """The CPUs not in the list `pod_cpus` (which must name some of ours, not all): keytap's.
    ValueError says why not."""
    try:
        pod = cpu_list(pod_cpus)
    except ValueError:
        raise ValueError("give a CPU list such as 0 or 0-1") from None
    cpus = os.sched_getaffinity(0)
    if not pod < cpus:
        raise ValueError(f"name some of CPUs {','.join(map(str, sorted(cpus)))}, not all, "
                         "and no others")
    return ",".join(map(str, sorted(cpus - pod)))


def wait_until_capturing(process: subprocess.Popen, log: Path) -> None:
    """Until keytap says it captures: BCC compiles its programs first, which takes a while."""
    wait_for_text(process, log, READY_LINE, 120)


def stop(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGINT (how a user stops tcpdump and keytap); False if it had to be SIGKILLed."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill(process)
        return False
    return True


def kill(process: subprocess.Popen) -> None:
    """SIGKILL its process group if still running: failed or interrupted, no need to be gentle."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def forget(lab: Lab, process: subprocess.Popen) -> None:
    """A process that has exited: no longer for Lab.destroy() to kill."""
    if process.poll() is not None and process in lab.processes:
        lab.processes.remove(process)


def reaped_cpu_s(process: subprocess.Popen, timeout_s: float) -> float:
    """Wait for `process` to exit (subprocess.TimeoutExpired after `timeout_s`) and reap it
    here: its CPU time (user + system, its children's included), which Popen.wait drops."""
    deadline = time.monotonic() + timeout_s
    while (ended := os.wait4(process.pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(process.args, timeout_s)
        time.sleep(0.005)
    process.returncode = os.waitstatus_to_exitcode(ended[1])
    return ended[2].ru_utime + ended[2].ru_stime


def discard(lab: Lab, process: subprocess.Popen) -> None:
    """Kill (if still running) and forget: a run's processes must not outlive the run."""
    kill(process)
    forget(lab, process)


def start_tls_server(lab: Lab, directory: Path, port: int, *options: str,
                     cwd: Path | None = None, outside: bool = False,
                     cpus: str | None = None, env: dict[str, str] | None = None
                     ) -> subprocess.Popen:
    """`openssl s_server` in the pod namespace (the system libssl) with a fresh P-256 cert;
    `outside`: in the client's namespace instead, for clients in the pod; `cpus`: pinned;
    `env`: its environment (default keytap's)."""
    ns, ip = (lab.client, lab.client_ip) if outside else (lab.pod, lab.pod_ip)
    cert, key = make_certificate(directory)
    server = lab.spawn(ns, *pinned(cpus, "openssl", "s_server", "-accept", f"{ip}:{port}",
                                   "-cert", str(cert), "-key", str(key), *options),
                       cwd=cwd, stderr=subprocess.DEVNULL, env=env)
    lab.wait_for_port(ns, ip=ip, port=port)
    return server


def cpu_s(process: subprocess.Popen) -> float:
    """A running process's CPU time so far, user and system (`ip netns exec` execs the
    command: the Popen's pid is the command's)."""
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def medians(results: list[R], group: Callable[[R], Hashable],
            value: Callable[[R], float]) -> list[R]:
    """Per group, the run with the median value (a failure if all failed): robust to outliers."""
    groups: dict[Hashable, list[R]] = {}
    for r in results:
        groups.setdefault(group(r), []).append(r)
    chosen = []
    for runs in groups.values():
        good = sorted((r for r in runs if not r.error), key=value)
        chosen.append(good[(len(good) - 1) // 2] if good else runs[0])
    return chosen


def baselines(runs: list[R], names: Callable[[R], tuple[str, str]],
              value: Callable[[R], float]) -> dict[str, float]:
    """Per item (the first name), the value of its run with no capture ("none"), the reference
    of its "vs none" column."""
    return {names(r)[0]: value(r) for r in runs if names(r)[1] == "none" and not r.error}


def comparison(header: tuple[str, ...], runs: list[R], names: Callable[[R], tuple[str, str]],
               cells: Callable[[R], tuple[str, ...]]) -> str:
    """A table, one row per run: its two names (item, way), then cells(run), or for a failed
    run the reason, so a failure stays in sight among the numbers."""
    rows: list[tuple[str, ...]] = [header]
    for r in runs:
        rows.append((*names(r), f"FAILED: {r.error}") if r.error else (*names(r), *cells(r)))
    return "\n".join(render(rows))


def render(rows: list[tuple[str, ...]], left: int = 2) -> list[str]:
    """Aligned columns, the first `left` to the left, numbers to the right, a rule under the
    header; a row shorter than the header (a failed run) is its names and then its reason."""
    header = rows[0]
    full = [row for row in rows if len(row) == len(header)]
    widths = [max(len(row[i]) for row in full) for i in range(len(header))]
    lines = []
    for row in rows:
        if len(row) != len(header):  # a failed run: its names, then its reason
            names = (f"{cell:<{width}}" for cell, width in zip(row[:-1], widths, strict=False))
            lines.append("  ".join([*names, row[-1]]))
            continue
        lines.append("  ".join(f"{cell:<{width}}" if i < left else f"{cell:>{width}}"
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True)))
                     .rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return lines
