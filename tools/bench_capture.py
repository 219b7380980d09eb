"""Compare iperf3 throughput with no capture, with tcpdump and with keytap on the pod's veth.

Not a test (numbers depend on the machine). Needs root, BCC, tcpdump and iperf3; builds the lab
network of keytap/labnet.py (client ns -> node ns -> pod ns) and removes it when done, also
on Ctrl-C. Run from anywhere:

    sudo .venv/bin/python tools/bench_capture.py [--seconds 10] [--workloads bulk,udp64]
        [--repeat N] [--keytap-arg=--no-tls]

Workloads (client -> pod, iperf3 against a server in the pod namespace):
  bulk   TCP, default writes: few, large (GSO) packets
  udp64  UDP, 64-byte datagrams, unlimited rate: many small packets at a constant size
  tcp64  (not run by default) TCP with 64-byte writes, TCP_NODELAY and autocorking off in the
         client ns: small segments only while the sender is the bottleneck; once a capturer
         slows the path, the writes pile up and leave as large segments, so the packet count
         differs between capturers and the throughput ratio compares different workloads

For each capturer: throughput relative to no capture, what it saw, wrote and lost. tcpdump's
numbers are its own report on SIGINT ("received by filter" = saw, "captured" = wrote, "dropped
by kernel" = lost), keytap's its summary; seen/s is seen divided by --seconds. Capture files go
to a temporary directory (override with --dir) and are deleted after each run, their size
reported. Results go to standard output, progress to standard error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from keytap.labnet import Lab, remove_stale_labs

REPO = Path(__file__).resolve().parents[1]  # `python -m keytap` runs from here: this checkout
READY = "keytap: capturing on"  # as tests/lab/runner.py waits for it

PORT = 5201
WORKLOADS: dict[str, list[str]] = {  # iperf3 client arguments
    "bulk": [],
    "tcp64": ["-l", "64", "-N"],
    "udp64": ["-u", "-b", "0", "-l", "64"],
}
# Without this, TCP autocorking merges the small writes into large segments whenever one is
# still queued (always, here): -l 64 alone gives packets of ~1.5 KB on average, not ~110 bytes.
AUTOCORKING = {"tcp64": "0"}
CAPTURERS = ("none", "tcpdump", "keytap")
KEYTAP_SUMMARY = re.compile(
    r"keytap: (?P<seen>\d+) packets seen by the classifier, (?P<written>\d+) written, "
    r"(?P<dropped>\d+) dropped")
TCPDUMP_COUNTS = {
    "written": re.compile(r"^(\d+) packets? captured", re.M),
    "seen": re.compile(r"^(\d+) packets? received by filter", re.M),
    "dropped": re.compile(r"^(\d+) packets? dropped by kernel", re.M),
}


@dataclass
class Result:
    """One iperf3 run under one capturer."""

    workload: str
    capturer: str
    bps: float = 0.0
    udp_lost_percent: float | None = None
    seen: int | None = None
    written: int | None = None
    dropped: int | None = None
    file_bytes: int | None = None
    error: str | None = None


class Interrupted(Exception):
    """SIGTERM or SIGHUP: unwind through every finally like Ctrl-C does."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


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


def last_line(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def stop(process: subprocess.Popen, log: Path, timeout_s: float = 120) -> str:
    """SIGINT (how a user stops tcpdump and keytap), then all it wrote to stderr."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        note = f"\n(killed: still running {timeout_s:.0f}s after SIGINT)"
        return log.read_text(errors="replace") + note
    return log.read_text(errors="replace")


def first_int(pattern: re.Pattern[str], text: str) -> int | None:
    match = pattern.search(text)
    return int(match[1]) if match else None


class Bench:
    """The lab, the iperf3 server, and one run per (workload, capturer)."""

    def __init__(self, lab: Lab, seconds: int, directory: Path, keytap_args: list[str]) -> None:
        self.lab, self.seconds, self.directory = lab, seconds, directory
        self.keytap_args = keytap_args

    def start_server(self) -> None:
        self.lab.spawn(self.lab.pod, "iperf3", "-s", "-B", self.lab.pod_ip, "-p", str(PORT))
        self.lab.wait_for_port(self.lab.pod, ip=self.lab.pod_ip, port=PORT)

    def iperf(self, workload: str) -> dict:
        """Run the client for `seconds`; its JSON report."""
        self.lab.run(self.lab.client, "sysctl", "-qw",  # the client's netns only
                     f"net.ipv4.tcp_autocorking={AUTOCORKING.get(workload, '1')}")
        client = self.lab.spawn(
            self.lab.client, "iperf3", "-c", self.lab.pod_ip, "-p", str(PORT),
            "-t", str(self.seconds), "-J", *WORKLOADS[workload],
            stdout=subprocess.PIPE, text=True)
        try:
            out, err = client.communicate(timeout=self.seconds + 60)
        finally:
            self._forget(client)
        try:
            report = json.loads(out)
        except json.JSONDecodeError:
            raise RuntimeError(f"iperf3 exited with {client.returncode}: {err.strip()}") from None
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        return report

    def run(self, workload: str, capturer: str) -> Result:
        result = Result(workload, capturer)
        suffix = "pcapng" if capturer == "keytap" else "pcap"
        output = self.directory / f"{workload}-{capturer}.{suffix}"
        log = self.directory / f"{workload}-{capturer}.stderr"
        process = None
        try:
            with log.open("w") as stderr:
                if capturer == "tcpdump":
                    process = self.lab.spawn(
                        self.lab.node, "tcpdump", "-i", self.lab.pod_veth, "-s", "262144",
                        "-B", "262144", "--immediate-mode", "-w", str(output), stderr=stderr)
                    wait_for_text(process, log, "listening on", 30)
                elif capturer == "keytap":
                    process = self.lab.spawn(
                        self.lab.node, sys.executable, "-m", "keytap", "capture",
                        "-i", self.lab.pod_veth, "-o", str(output), *self.keytap_args,
                        stderr=stderr, cwd=REPO)
                    wait_for_text(process, log, READY, 120)  # BCC compiles the classifier first
            report = self.iperf(workload)
            if process is not None:
                self._account(result, stop(process, log))
                self._forget(process)
                process = None
            self._throughput(result, report)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            result.error = last_line(str(error))[:120]
        finally:
            if process is not None:  # failed or interrupted: no need to be gentle
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                self._forget(process)
            if output.exists():
                result.file_bytes = output.stat().st_size
                output.unlink()
            log.unlink(missing_ok=True)
        return result

    def _forget(self, process: subprocess.Popen) -> None:
        """A process that has exited: no longer for Lab.destroy() to kill."""
        if process.poll() is not None and process in self.lab.processes:
            self.lab.processes.remove(process)

    @staticmethod
    def _throughput(result: Result, report: dict) -> None:
        """What the pod received (for UDP: after the receiver's losses)."""
        end = report["end"]
        if "sum_received" in end:
            received = end["sum_received"]
            result.bps = received["bits_per_second"]
        else:  # an older iperf3 reporting UDP: the sender's rate and the receiver's loss
            received = end["sum"]
            result.bps = received["bits_per_second"] * (1 - received["lost_percent"] / 100)
        if "lost_percent" in received:
            result.udp_lost_percent = received["lost_percent"]

    @staticmethod
    def _account(result: Result, stderr: str) -> None:
        if result.capturer == "keytap":
            match = KEYTAP_SUMMARY.search(stderr)
            if match is None:
                raise RuntimeError(f"no keytap summary: {last_line(stderr)}")
            result.seen, result.written, result.dropped = (
                int(match[k]) for k in ("seen", "written", "dropped"))
        else:
            counts = {k: first_int(p, stderr) for k, p in TCPDUMP_COUNTS.items()}
            if counts["seen"] is None:
                raise RuntimeError(f"no tcpdump statistics: {last_line(stderr)}")
            result.seen, result.written, result.dropped = (
                counts["seen"], counts["written"], counts["dropped"])


def medians(results: list[Result]) -> list[Result]:
    """Per (workload, capturer), the run with the median throughput (a failure if all failed)."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.workload, r.capturer), []).append(r)
    chosen = []
    for runs in groups.values():
        good = sorted((r for r in runs if not r.error), key=lambda r: r.bps)
        chosen.append(good[(len(good) - 1) // 2] if good else runs[0])
    return chosen


def fmt_count(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 10_000_000:
        return f"{value / 1e6:.0f}M"
    if value >= 100_000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def table(results: list[Result], seconds: int) -> str:
    """One row per run: throughput, ratio to no capture, the capturer's own counts."""
    header = ("workload", "capture", "Gbit/s", "UDP loss", "vs none", "seen", "seen/s",
              "written", "wr/seen", "dropped", "file MB")
    rows: list[tuple[str, ...]] = [header]
    baseline = {r.workload: r.bps for r in results if r.capturer == "none" and not r.error}
    for r in results:
        if r.error:
            rows.append((r.workload, r.capturer, f"FAILED: {r.error}"))
            continue
        base = baseline.get(r.workload)
        rows.append((
            r.workload, r.capturer, f"{r.bps / 1e9:.3f}",
            f"{r.udp_lost_percent:.1f}%" if r.udp_lost_percent is not None else "",
            f"{r.bps / base:.2f}" if base and r.capturer != "none" else "",
            fmt_count(r.seen),
            fmt_count(round(r.seen / seconds)) if r.seen is not None else "-",
            fmt_count(r.written),
            f"{100 * r.written / r.seen:.1f}%" if r.seen and r.written is not None else "-",
            fmt_count(r.dropped),
            f"{r.file_bytes / 1e6:.0f}" if r.file_bytes is not None else "-",
        ))
    full = [row for row in rows if len(row) == len(header)]
    widths = [max(len(row[i]) for row in full) for i in range(len(header))]
    lines = []
    for row in rows:
        if len(row) != len(header):  # a failed run: its reason after the names
            lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}")
            continue
        lines.append("  ".join(f"{cell:<{width}}" if i < 2 else f"{cell:>{width}}"
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True)))
                     .rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def ignore_signals() -> None:
    """Nothing may interrupt the cleanup."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="iperf3 -t per run (default 10)")
    parser.add_argument("--workloads", default="bulk,udp64",
                        help=f"comma-separated, from {','.join(WORKLOADS)} (default bulk,udp64)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every run, interleaved; the median run is shown")
    parser.add_argument("--dir", type=Path, help="where capture files go (default: a temp dir)")
    parser.add_argument("--keytap-arg", dest="keytap_args", action="append", default=[],
                        metavar="ARG", help="extra keytap argument, e.g. --keytap-arg=--no-tls")
    args = parser.parse_args()
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown or not args.workloads:
        parser.error(f"unknown workload(s) {sorted(unknown)}: choose from {list(WORKLOADS)}")
    if args.seconds <= 0 or args.repeat <= 0:
        parser.error("--seconds and --repeat must be positive")
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_capture: needs root (BPF, TC, network namespaces): run it with sudo")
    for tool in ("ip", "iperf3", "tcpdump"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_capture: {tool} is missing: run tools/setup")
    for signum in (signal.SIGTERM, signal.SIGHUP):  # unwind through every finally, like Ctrl-C
        signal.signal(signum, _raise_interrupted)
    results: list[Result] = []
    interrupted = False
    lab = Lab()
    directory = Path(tempfile.mkdtemp(prefix="keytap-bench-", dir=args.dir))
    try:
        remove_stale_labs()
        lab.create()
        bench = Bench(lab, args.seconds, directory, args.keytap_args)
        bench.start_server()
        for round_ in range(1, args.repeat + 1):
            for workload in args.workloads:
                for capturer in CAPTURERS:
                    print(f"bench_capture: round {round_}/{args.repeat}: {workload} with "
                          f"{capturer} ...", file=sys.stderr)
                    results.append(bench.run(workload, capturer))
    except (KeyboardInterrupt, Interrupted) as stopped:
        interrupted = True
        reason = str(stopped) or "SIGINT"
        print(f"bench_capture: interrupted ({reason}), cleaning up", file=sys.stderr)
    finally:
        ignore_signals()
        lab.destroy()  # SIGKILLs every process group spawned in the lab, deletes the netns
        shutil.rmtree(directory, ignore_errors=True)
    if results:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"iperf3 client -> pod, {args.seconds}s per run"
              f"{f', median of {args.repeat}' if args.repeat > 1 else ''}; capture on the pod's "
              f"veth; {os.cpu_count()} CPUs, load average now {load}"
              f"{'; INTERRUPTED' if interrupted else ''}")
        print(table(medians(results), args.seconds))
    if interrupted:
        return 130
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
