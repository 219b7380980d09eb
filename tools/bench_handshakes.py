"""Compare TLS handshakes per second of a pod's server with no keytap, keytap --no-tls, keytap.

Not a test (numbers depend on the machine). Needs root, BCC and openssl; builds the lab network
of keytap/labnet.py (client ns -> node ns -> pod ns) and removes it when done, also on Ctrl-C.
Run from anywhere:

    sudo .venv/bin/python tools/bench_handshakes.py [--seconds 10] [--repeat 3] [--clients 2]
        [--versions 1.3,1.2]

The server is `openssl s_server` in the pod namespace (the system libssl, one process, an EC
P-256 certificate); the load is `--clients` parallel `openssl s_time -new` in the client
namespace, each doing full handshakes back to back for --seconds (connect, handshake, close; no
session resumption). keytap runs in the node namespace on the pod's veth, as on a Kubernetes
node, so its uprobes fire in the server, once per handshake.

Three ways, interleaved in every round, median of --repeat rounds shown:
  none     no keytap
  no-tls   keytap --no-tls: the packet capture only
  tls      keytap as by default: packets and the TLS probes on the server's libssl

handshakes/s is the connections all clients completed divided by the wall time from starting
them to the last one's exit (s_time's own rates are per CPU second or whole seconds). keytap's
columns come from its --summary-json: handshakes its probes saw, TLS sessions it found on the
wire and how many of those got keys, packets it dropped. Results go to standard output, progress
to standard error.
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

from keytap.labnet import Lab, remove_stale_labs, sh

REPO = Path(__file__).resolve().parents[1]  # `python -m keytap` runs from here: this checkout
READY = "keytap: capturing on"  # as tests/lab/runner.py waits for it

PORT = 4433
VERSIONS = {"1.3": "-tls1_3", "1.2": "-tls1_2"}  # s_time options
CAPTURES: dict[str, list[str] | None] = {"none": None, "no-tls": ["--no-tls"], "tls": []}
S_TIME_CONNECTIONS = re.compile(r"^(\d+) connections in [\d.]+s;", re.M)


@dataclass
class Result:
    """One load run under one way of capturing."""

    version: str
    capture: str
    connections: int = 0
    elapsed_s: float = 0.0
    handshakes_seen: int | None = None
    sessions_seen: int | None = None
    sessions_with_keys: int | None = None
    dropped: int | None = None
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.connections / self.elapsed_s if self.elapsed_s else 0.0


class Interrupted(Exception):
    """SIGTERM or SIGHUP: unwind through every finally like Ctrl-C does."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def last_line(text: bytes | str) -> str:
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


def stop(process: subprocess.Popen, log: Path, timeout_s: float = 120) -> str:
    """SIGINT (how a user stops keytap), then all it wrote to stderr."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise RuntimeError(f"keytap still running {timeout_s:.0f}s after SIGINT") from None
    return log.read_text(errors="replace")


class Bench:
    """The lab, the TLS server, and one load run per (version, capture)."""

    def __init__(self, lab: Lab, seconds: int, clients: int, directory: Path) -> None:
        self.lab, self.seconds, self.clients, self.directory = lab, seconds, clients, directory

    def start_server(self) -> None:
        cert, key = self.directory / "cert.pem", self.directory / "key.pem"
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-nodes", "-days", "2", "-subj", "/CN=keytap-bench", "-keyout", str(key),
           "-out", str(cert))
        # -quiet and no pipes: s_time closes without a request, which s_server may report
        self.lab.spawn(self.lab.pod, "openssl", "s_server", "-accept", f"{self.lab.pod_ip}:{PORT}",
                       "-cert", str(cert), "-key", str(key), "-www", "-quiet",
                       stderr=subprocess.DEVNULL)
        self.lab.wait_for_port(self.lab.pod, ip=self.lab.pod_ip, port=PORT)

    def load(self, version: str) -> tuple[int, float]:
        """`clients` parallel s_time runs; all their connections and the wall time they took."""
        outputs = [self.directory / f"s_time{i}.out" for i in range(self.clients)]
        processes = []
        start = time.monotonic()
        try:
            for output in outputs:
                with output.open("w") as out:  # one character per connection: not a pipe
                    processes.append(self.lab.spawn(
                        self.lab.client, "openssl", "s_time", "-connect",
                        f"{self.lab.pod_ip}:{PORT}", "-new", "-time", str(self.seconds),
                        VERSIONS[version], stdout=out, stderr=subprocess.STDOUT))
            for process in processes:
                process.wait(timeout=self.seconds + 60)
            elapsed = time.monotonic() - start
        finally:
            for process in processes:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                self._forget(process)
        total = 0
        for process, output in zip(processes, outputs, strict=True):
            text = output.read_text(errors="replace")
            output.unlink()
            match = S_TIME_CONNECTIONS.search(text)
            if process.returncode != 0 or match is None:
                raise RuntimeError(f"s_time exited with {process.returncode}: {last_line(text)}")
            total += int(match[1])
        return total, elapsed

    def run(self, version: str, capture: str) -> Result:
        result = Result(version, capture)
        output = self.directory / f"{version}-{capture}.pcapng"
        summary = self.directory / f"{version}-{capture}.json"
        log = self.directory / f"{version}-{capture}.stderr"
        process = None
        try:
            keytap_args = CAPTURES[capture]
            if keytap_args is not None:
                with log.open("w") as stderr:
                    process = self.lab.spawn(
                        self.lab.node, sys.executable, "-m", "keytap", "capture",
                        "-i", self.lab.pod_veth, "-o", str(output), "--summary-json", str(summary),
                        *keytap_args, stderr=stderr, cwd=REPO)
                wait_for_text(process, log, READY, 120)  # BCC compiles its programs first
            result.connections, result.elapsed_s = self.load(version)
            if process is not None:
                stop(process, log)
                self._forget(process)
                process = None
                self._account(result, summary)
        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as error:
            result.error = last_line(str(error))[:120]
        finally:
            if process is not None:  # failed or interrupted: no need to be gentle
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                self._forget(process)
            for path in (output, summary, log):
                path.unlink(missing_ok=True)
        return result

    def _forget(self, process: subprocess.Popen) -> None:
        """A process that has exited: no longer for Lab.destroy() to kill."""
        if process.poll() is not None and process in self.lab.processes:
            self.lab.processes.remove(process)

    @staticmethod
    def _account(result: Result, summary: Path) -> None:
        report = json.loads(summary.read_text())
        result.dropped = report["packets"]["dropped"]
        tls = report.get("tls", {})
        result.handshakes_seen = tls.get("handshakes")
        result.sessions_seen = tls.get("sessions_seen")
        result.sessions_with_keys = tls.get("sessions_with_keys")


def medians(results: list[Result]) -> list[Result]:
    """Per (version, capture), the run with the median rate (a failure if all failed)."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.version, r.capture), []).append(r)
    chosen = []
    for runs in groups.values():
        good = sorted((r for r in runs if not r.error), key=lambda r: r.rate)
        chosen.append(good[(len(good) - 1) // 2] if good else runs[0])
    return chosen


def fmt(value: int | None) -> str:
    return "-" if value is None else str(value)


def table(chosen: list[Result], results: list[Result]) -> str:
    """One row per (version, capture): rate, ratio to no keytap, what keytap saw."""
    header = ("TLS", "keytap", "handshakes/s", "vs none", "spread", "connections", "hs seen",
              "sessions", "with keys", "dropped")
    rows: list[tuple[str, ...]] = [header]
    baseline = {r.version: r.rate for r in chosen if r.capture == "none" and not r.error}
    for r in chosen:
        if r.error:
            rows.append((r.version, r.capture, f"FAILED: {r.error}"))
            continue
        rates = [x.rate for x in results
                 if (x.version, x.capture) == (r.version, r.capture) and not x.error]
        spread = (f"{min(rates):.0f}-{max(rates):.0f}" if len(rates) > 1 else "")
        base = baseline.get(r.version)
        rows.append((
            r.version, r.capture, f"{r.rate:.0f}",
            f"{r.rate / base:.3f}" if base and r.capture != "none" else "",
            spread, str(r.connections), fmt(r.handshakes_seen), fmt(r.sessions_seen),
            fmt(r.sessions_with_keys), fmt(r.dropped),
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
    parser.add_argument("--seconds", type=int, default=10,
                        help="s_time -time per measurement (default 10)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of every measurement, interleaved; medians shown (default 3)")
    parser.add_argument("--clients", type=int, default=2,
                        help="parallel s_time processes (default 2)")
    parser.add_argument("--versions", default="1.3,1.2",
                        help="comma-separated TLS versions, from 1.3,1.2 (default both)")
    parser.add_argument("--dir", type=Path, help="where capture files go (default: a temp dir)")
    args = parser.parse_args()
    args.versions = [v for v in args.versions.split(",") if v]
    unknown = set(args.versions) - set(VERSIONS)
    if unknown or not args.versions:
        parser.error(f"unknown version(s) {sorted(unknown)}: choose from {list(VERSIONS)}")
    if args.seconds <= 0 or args.repeat <= 0 or args.clients <= 0:
        parser.error("--seconds, --repeat and --clients must be positive")
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_handshakes: needs root (BPF, TC, network namespaces): run it with sudo")
    for tool in ("ip", "openssl"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_handshakes: {tool} is missing: run tools/setup")
    for signum in (signal.SIGTERM, signal.SIGHUP):  # unwind through every finally, like Ctrl-C
        signal.signal(signum, _raise_interrupted)
    results: list[Result] = []
    interrupted = False
    lab = Lab()
    directory = Path(tempfile.mkdtemp(prefix="keytap-bench-", dir=args.dir))
    try:
        remove_stale_labs()
        lab.create()
        bench = Bench(lab, args.seconds, args.clients, directory)
        bench.start_server()
        for round_ in range(1, args.repeat + 1):
            for version in args.versions:
                for capture in CAPTURES:
                    print(f"bench_handshakes: round {round_}/{args.repeat}: TLS {version}, "
                          f"keytap {capture} ...", file=sys.stderr)
                    result = bench.run(version, capture)
                    results.append(result)
                    print(f"bench_handshakes:   {result.error or f'{result.rate:.0f}/s'}",
                          file=sys.stderr)
    except (KeyboardInterrupt, Interrupted) as stopped:
        interrupted = True
        reason = str(stopped) or "SIGINT"
        print(f"bench_handshakes: interrupted ({reason}), cleaning up", file=sys.stderr)
    finally:
        ignore_signals()
        lab.destroy()  # SIGKILLs every process group spawned in the lab, deletes the netns
        shutil.rmtree(directory, ignore_errors=True)
    if results:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        chosen = medians(results)
        print(f"openssl s_time -new x{args.clients} (client ns) -> openssl s_server (pod), "
              f"{args.seconds}s per run{f', median of {args.repeat}' if args.repeat > 1 else ''}"
              f"; keytap on the pod's veth; {os.cpu_count()} CPUs, load average now {load}"
              f"{'; INTERRUPTED' if interrupted else ''}")
        print(table(chosen, results))
    if interrupted:
        return 130
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
