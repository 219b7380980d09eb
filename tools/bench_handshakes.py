"""Compare TLS handshakes per second of a pod's server with no keytap, keytap --no-tls, keytap.

Not a test (numbers depend on the machine). Needs root, BCC and openssl; builds the lab network
of keytap/labnet.py (client ns -> node ns -> pod ns) and removes it when done, also on Ctrl-C.
Run from anywhere:

    sudo .venv/bin/python tools/bench_handshakes.py [--seconds 10] [--repeat 3] [--clients 2]
        [--versions 1.3,1.2]

The server is `openssl s_server` in the pod namespace (the system libssl, one process, an EC
P-256 certificate), or with `--server go` the lab's Go HTTPS peer (tests/support/go_peer, built
by Debian's Go: Go's crypto/tls, probed at writeKeyLog); the load is `--clients` parallel
`openssl s_time -new` in the client namespace, each doing full handshakes back to back for
--seconds (connect, handshake, close; no session resumption). keytap runs in the node namespace
on the pod's veth, as on a Kubernetes node, so its uprobes fire in the server, once per
handshake.

Four ways (--ways picks some), interleaved in every round, median of --repeat rounds shown:
  none           no keytap
  no-tls         keytap --no-tls: the packet capture only
  tls-unchecked  keytap --no-session-checks: TLS probes, the layout proven once, sessions
                 not checked one by one
  tls            keytap as by default: every session's keys checked against its records

handshakes/s is the connections all clients completed divided by the wall time from starting
them to the last one's exit (s_time's own rates are per CPU second or whole seconds); "vs none"
is the median of each round's rate over the rate with no keytap of the same round ("its
range": the lowest and highest), steadier than a ratio of medians on a VM whose speed wanders
by 10-20% over minutes. keytap's columns come from its --summary-json: handshakes its probes
saw, TLS sessions it found on the wire and how many of those got keys, its CPU time ("us/hs":
per connection of the load, its start left out), the packets its reorder buffer set aside
until their keys came, per connection ("held/hs"), packets it dropped. "pod us/hs" is the
server's own CPU time per connection, what the probes' traps add to the pod included. Results
go to standard output, progress (each run's rate, pod us/hs and the load's busy share) to
standard error.

"at speed" (and its range) is each round's ratio to no keytap of the load's busy share: the
clients' CPU time (user + system) over the wall time, that is the rate times the load's CPU
time per connection. A VM that slows down raises the CPU time per connection as it lowers the
rate, leaving the product; keytap taking CPU time from the load, or probes slowing the server,
lower the rate alone. So it is the ratio of the rates at one speed of the VM: on this VM its
rounds spread by 1-3% where the rates spread by 10-40%. It would miss only a cost that slows
the clients' own code (keytap's work evicting their caches). The last lines say what checking
every session costs: tls over tls-unchecked of each round, as rates and at speed.

On this 2-CPU machine every microsecond keytap spends is taken from the server and the load.
`--pod-cpus LIST` pins the server and the load to those CPUs and keytap to the others: a node
where keytap has CPU of its own, as when the pod runs under a CPU limit. The rates then show
what keytap costs the pod itself: the probes' traps, the BPF programs and the classifier, all
run on the pod's CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import benchlib

from keytap.demo.labnet import Lab
from tests.support.go_builds import go_peer  # on the path through benchlib
from tests.support.tls_lab import make_certificate

PORT = 4433
VERSIONS = {"1.3": "-tls1_3", "1.2": "-tls1_2"}  # s_time options
CAPTURES: dict[str, list[str] | None] = {
    "none": None, "no-tls": ["--no-tls"], "tls-unchecked": ["--no-session-checks"], "tls": []}
S_TIME_CONNECTIONS = re.compile(r"^(\d+) connections in [\d.]+s;", re.M)


@dataclass
class Result(benchlib.Run):
    """One load run under one way of capturing."""

    version: str
    capture: str
    round_: int = 0
    connections: int = 0
    elapsed_s: float = 0.0
    handshakes_seen: int | None = None
    sessions_seen: int | None = None
    sessions_with_keys: int | None = None
    verified: int | None = None
    cpu_s: float | None = None  # keytap's CPU time (user + system), BCC's compile included
    start_cpu_s: float | None = None  # of which its start, up to "capturing"
    server_cpu_s: float = 0.0  # the pod's server's CPU time during the load (probes included)
    client_cpu_s: float = 0.0  # the load's CPU time (user + system)
    proofs_s: float | None = None  # the time the proofs took (wall clock, in the capture loop)
    packets_held: int | None = None  # packets the reorder buffer set aside until keys came
    dropped: int | None = None

    @property
    def rate(self) -> float:
        return self.connections / self.elapsed_s if self.elapsed_s else 0.0


class LoadDone(NamedTuple):
    """What a load did: connections, the wall time they took, the clients' CPU time."""

    connections: int
    elapsed_s: float
    client_cpu_s: float


@dataclass
class Load:
    """s_time runs started at `start`: each with the file its output goes to."""

    start: float
    runs: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)


def system_libssl() -> Path:
    """The libssl that `openssl` loads (from ldd)."""
    listing = subprocess.run(["ldd", shutil.which("openssl") or "openssl"], capture_output=True,
                             text=True, check=True).stdout
    match = re.search(r"^\s*libssl\.so\S*\s+=>\s+(\S+)", listing, re.M)
    if match is None:
        raise RuntimeError(f"no libssl in ldd openssl: {listing.strip()}")
    return Path(match[1])


def names(result: Result) -> tuple[str, str]:
    """What a run measured and with what capture: its group for medians, its row's names."""
    return result.version, result.capture


class Bench:
    """The lab, the TLS server, and one load run per (version, capture)."""

    def __init__(self, lab: Lab, seconds: int, clients: int, directory: Path,
                 server: str = "openssl", pod_cpus: str | None = None,
                 keytap_cpus: str | None = None) -> None:
        self.lab, self.seconds, self.clients, self.directory = lab, seconds, clients, directory
        self.server = server
        self.pod_cpus, self.keytap_cpus = pod_cpus, keytap_cpus  # CPU lists, None: anywhere
        self.server_process: subprocess.Popen | None = None

    def start_server(self, own_copy: bool = False) -> None:
        """`own_copy`: run the server from a copy of its file (the Go peer; s_server's libssl)
        in the bench's directory, one no other pod maps: keytap probes it only while this pod
        is in its scope (uprobes are per file)."""
        if self.server == "go":
            cert, key = make_certificate(self.directory)
            peer = go_peer("system", "plain").path
            if own_copy:
                peer = Path(shutil.copy2(peer, self.directory / peer.name))
            self.server_process = self.lab.spawn(
                self.lab.pod, *benchlib.pinned(
                    self.pod_cpus, str(peer), "-listen", f"{self.lab.pod_ip}:{PORT}", "-cert",
                    str(cert), "-key", str(key)),
                stderr=subprocess.DEVNULL)  # Go logs each handshake s_time drops
            self.lab.wait_for_port(self.lab.pod, ip=self.lab.pod_ip, port=PORT)
            return
        env = None
        if own_copy:
            libssl = system_libssl()
            shutil.copy2(libssl, self.directory / libssl.name)
            env = {**os.environ, "LD_LIBRARY_PATH": str(self.directory)}
        # -quiet and no pipes: s_time closes without a request, which s_server may report
        self.server_process = benchlib.start_tls_server(self.lab, self.directory, PORT,
                                                        "-www", "-quiet", cpus=self.pod_cpus,
                                                        env=env)

    def load(self, version: str) -> LoadDone:
        """`clients` parallel s_time runs, done."""
        return self.load_done(self.load_started(version))

    def load_started(self, version: str) -> Load:
        """The `clients` s_time runs of `load`, started."""
        load = Load(time.monotonic())
        try:
            for i in range(self.clients):
                output = self.directory / f"s_time{i}.out"
                with output.open("w") as out:  # one character per connection: not a pipe
                    load.runs.append((self.lab.spawn(
                        self.lab.client, *benchlib.pinned(
                            self.pod_cpus, "openssl", "s_time", "-connect",
                            f"{self.lab.pod_ip}:{PORT}", "-new", "-time", str(self.seconds),
                            VERSIONS[version]), stdout=out, stderr=subprocess.STDOUT), output))
        except BaseException:
            for process, _ in load.runs:
                benchlib.discard(self.lab, process)
            raise
        return load

    def load_done(self, load: Load) -> LoadDone:
        """Wait for a started load."""
        cpu_s = 0.0
        try:
            for process, _ in load.runs:
                cpu_s += benchlib.reaped_cpu_s(process, timeout_s=self.seconds + 60)
            elapsed = time.monotonic() - load.start
        finally:
            for process, _ in load.runs:
                benchlib.discard(self.lab, process)
        total = 0
        for process, output in load.runs:
            text = output.read_text(errors="replace")
            output.unlink()
            match = S_TIME_CONNECTIONS.search(text)
            if process.returncode != 0 or match is None:
                raise RuntimeError(f"s_time exited with {process.returncode}: "
                                   f"{benchlib.last_line(text)}")
            total += int(match[1])
        return LoadDone(total, elapsed, cpu_s)

    def run(self, version: str, capture: str, round_: int) -> Result:
        result = Result(version, capture, round_)
        output = self.directory / f"{version}-{capture}.pcapng"
        summary = self.directory / f"{version}-{capture}.json"
        log = self.directory / f"{version}-{capture}.stderr"
        process = None
        try:
            keytap_args = CAPTURES[capture]
            if keytap_args is not None:
                process = benchlib.spawn_keytap(self.lab, log, "-o", str(output),
                                                "--summary-json", str(summary), *keytap_args,
                                                cpus=self.keytap_cpus)
                benchlib.wait_until_capturing(process, log)
            assert self.server_process is not None
            before = benchlib.cpu_s(self.server_process)
            result.connections, result.elapsed_s, result.client_cpu_s = self.load(version)
            result.server_cpu_s = benchlib.cpu_s(self.server_process) - before
            if process is not None:
                if not benchlib.stop(process):
                    raise RuntimeError(f"keytap still running {benchlib.STOP_TIMEOUT_S:.0f}s "
                                       "after SIGINT")
                benchlib.forget(self.lab, process)
                process = None
                self._account(result, summary)
        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as error:
            result.error = benchlib.last_line(str(error))[:120]
        finally:
            if process is not None:  # failed or interrupted
                benchlib.discard(self.lab, process)
            for path in (output, summary, log):
                path.unlink(missing_ok=True)
        return result

    @staticmethod
    def _account(result: Result, summary: Path) -> None:
        report = json.loads(summary.read_text())
        result.dropped = report["packets"]["dropped"]
        tls = report.get("tls", {})
        result.handshakes_seen = tls.get("handshakes")
        result.sessions_seen = tls.get("sessions_seen")
        result.sessions_with_keys = tls.get("sessions_with_keys")
        result.verified = sum(c["verified"] for c in tls.get("verification", {}).values())
        result.cpu_s = report.get("cpu_s")
        result.start_cpu_s = report.get("start_cpu_s")
        result.proofs_s = tls.get("proofs_s")
        result.packets_held = tls.get("packets_held")


def fmt(value: int | None) -> str:
    return "-" if value is None else str(value)


def table(chosen: list[Result], results: list[Result]) -> str:
    """One row per (version, capture): rate, ratio to no keytap, what keytap saw."""
    header = ("TLS", "keytap", "handshakes/s", "vs none", "its range", "at speed", "its range",
              "spread", "connections", "hs seen", "sessions", "with keys", "verified", "CPU s",
              "us/hs", "pod us/hs", "held/hs", "dropped")

    def cells(r: Result) -> tuple[str, ...]:
        rates = [x.rate for x in results if names(x) == names(r) and not x.error]
        spread = (f"{min(rates):.0f}-{max(rates):.0f}" if len(rates) > 1 else "")
        ratios = paired_ratios(results, r.version, r.capture, "none")
        at_speed = paired_ratios(results, r.version, r.capture, "none", load_busy)
        return (
            f"{r.rate:.0f}", *median_and_range(ratios), *median_and_range(at_speed), spread,
            str(r.connections), fmt(r.handshakes_seen), fmt(r.sessions_seen),
            fmt(r.sessions_with_keys), fmt(r.verified),
            "-" if r.cpu_s is None else f"{r.cpu_s:.2f}", per_handshake(r),
            pod_us(r),
            f"{r.packets_held / r.connections:.1f}" if r.packets_held is not None
            and r.connections else "-",
            fmt(r.dropped),
        )

    return benchlib.comparison(header, chosen, names, cells) + "\n" + check_costs(results)


def median_and_range(ratios: list[float]) -> tuple[str, str]:
    """Sorted ratios as their median and range (cells of the table)."""
    return (f"{statistics.median(ratios):.3f}" if ratios else "",
            f"{ratios[0]:.3f}-{ratios[-1]:.3f}" if len(ratios) > 1 else "")


def pod_us(r: Result) -> str:
    """The server's CPU time per connection, what the probes' traps add to it included."""
    return f"{r.server_cpu_s / r.connections * 1e6:.0f}" if r.connections else "-"


def load_busy(r: Result) -> float:
    """The share of the run's time the load spent on a CPU: its rate times its CPU time per
    connection. A VM that slows down lowers the rate and raises the CPU time per connection
    alike, leaving this; CPU time taken from the load, or a server made slower by probes,
    lowers the rate alone. Its ratio between two ways is the ratio of their rates at one
    speed of the VM ("at speed"), where the clients' own code runs as fast in both (keytap's
    work in their caches would not show)."""
    return r.client_cpu_s / r.elapsed_s if r.elapsed_s else 0.0


def per_handshake(r: Result) -> str:
    """keytap_us as a cell of the table."""
    us = keytap_us(r)
    return "-" if us is None else f"{us:.0f}"


def keytap_us(r: Result) -> float | None:
    """keytap's CPU time per connection of the load once capturing (its start left out): a
    steadier figure than the rates, which this VM spreads by 10-20% from round to round."""
    if r.cpu_s is None or r.start_cpu_s is None or not r.connections:
        return None
    return (r.cpu_s - r.start_cpu_s) / r.connections * 1e6


def paired(results: list[Result], version: str, capture: str,
           reference: str) -> list[tuple[Result, Result]]:
    """The runs of `capture` with the run of `reference` of the same round: run back to back,
    so the machine's drift (its rates wander by 10-20% over minutes here) hits both alike."""
    pairs = []
    for round_ in sorted({r.round_ for r in results}):
        by = {r.capture: r for r in results
              if (r.version, r.round_) == (version, round_) and not r.error}
        run, base = by.get(capture), by.get(reference)
        if capture != reference and run is not None and base is not None and base.rate:
            pairs.append((run, base))
    return pairs


def paired_ratios(results: list[Result], version: str, capture: str, reference: str,
                  value: Callable[[Result], float] = lambda r: r.rate) -> list[float]:
    """Each round's `value` (the rate) of `capture` over that of `reference`, sorted."""
    return sorted(value(run) / value(base)
                  for run, base in paired(results, version, capture, reference) if value(base))


def check_costs(results: list[Result]) -> str:
    """What checking every session against its records costs: tls against tls-unchecked of
    the same round, the median of the rounds' ratios and their range."""
    lines = []
    for version in dict.fromkeys(r.version for r in results):
        pairs = [(on, off) for on, off in paired(results, version, "tls", "tls-unchecked")
                 if on.connections]
        if not pairs:
            continue
        ratios = sorted(on.rate / off.rate for on, off in pairs)
        at_speed = paired_ratios(results, version, "tls", "tls-unchecked", load_busy)
        # keytap's own account of the proofs: their time per session, and as a share of the
        # machine's CPU time over the run (what they could have taken from the pod)
        proofs = [(on.proofs_s / on.sessions_seen,
                   on.proofs_s / (on.elapsed_s * (os.cpu_count() or 1)))
                  for on, _ in pairs if on.proofs_s is not None and on.sessions_seen]
        loop = [(keytap_us(on), keytap_us(off)) for on, off in pairs
                if keytap_us(on) is not None and keytap_us(off) is not None]
        lines.append(f"TLS {version}: checking every session: handshakes/s "
                     f"x{statistics.median(ratios):.3f} of tls-unchecked (median of "
                     f"{len(ratios)} rounds, x{ratios[0]:.3f}-x{ratios[-1]:.3f})"
                     + (f"; at speed x{statistics.median(at_speed):.3f} "
                        f"(x{at_speed[0]:.3f}-x{at_speed[-1]:.3f})" if at_speed else "")
                     + (f"; the proofs took {statistics.median(p for p, _ in proofs) * 1e6:.0f}"
                        f" us per session, {statistics.median(s for _, s in proofs):.2%}"
                        " of the machine's CPU time" if proofs else "")
                     + (f"; keytap's us/hs {statistics.median(a for a, _ in loop):.0f}"
                        f" against {statistics.median(b for _, b in loop):.0f} unchecked"
                        if loop else ""))
    return "\n".join(lines)


def load_parser(doc: str, seconds: int, repeat: int) -> argparse.ArgumentParser:
    """The options of a handshake load (this bench's and bench_twins'), but --pod-cpus."""
    parser = benchlib.argument_parser(doc)
    parser.add_argument("--seconds", type=int, default=seconds,
                        help=f"s_time -time per measurement (default {seconds})")
    parser.add_argument("--repeat", type=int, default=repeat,
                        help=f"rounds of every measurement, interleaved (default {repeat})")
    parser.add_argument("--clients", type=int, default=2,
                        help="parallel s_time processes per pod (default 2)")
    parser.add_argument("--server", choices=("openssl", "go"), default="openssl",
                        help="the pod's TLS server: openssl s_server or the Go peer")
    parser.add_argument("--ways", default=",".join(CAPTURES),
                        help=f"comma-separated ways to capture, from {','.join(CAPTURES)} "
                             "(default all)")
    return parser


def load_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The options of `load_parser` and --pod-cpus, checked; `keytap_cpus`: the other CPUs
    (None when --pod-cpus is)."""
    args = benchlib.parse_tls_args(parser, VERSIONS)
    args.ways = benchlib.choices(parser, args.ways, CAPTURES, "way")
    if args.seconds <= 0 or args.repeat <= 0 or args.clients <= 0:
        parser.error("--seconds, --repeat and --clients must be positive")
    args.keytap_cpus = None
    if args.pod_cpus is not None:
        try:
            args.keytap_cpus = benchlib.other_cpus(args.pod_cpus)
        except ValueError as error:
            parser.error(f"--pod-cpus {args.pod_cpus!r}: {error}")
    return args


def parse_args() -> argparse.Namespace:
    parser = load_parser(__doc__, seconds=10, repeat=3)
    parser.add_argument("--pod-cpus", metavar="LIST",
                        help="pin the server and the load to these CPUs (\"0\", \"0-1\") and "
                             "keytap to the others (default: all share every CPU)")
    return load_args(parser)


def main() -> int:
    args = parse_args()

    def rounds(lab: Lab, directory: Path, results: list[Result]) -> None:
        bench = Bench(lab, args.seconds, args.clients, directory, args.server, args.pod_cpus,
                      args.keytap_cpus)
        bench.start_server()
        for round_, version, capture in benchlib.interleaved(args.repeat, args.versions,
                                                            args.ways):
            print(f"bench_handshakes: round {round_}/{args.repeat}: TLS {version}, "
                  f"keytap {capture} ...", file=sys.stderr)
            result = bench.run(version, capture, round_)
            results.append(result)
            print(f"bench_handshakes:   {result.error or f'{result.rate:.0f}/s'}"
                  f"{f', pod {pod_us(result)} us/hs' if result.connections else ''}"
                  f", load busy {load_busy(result):.3f}",
                  file=sys.stderr)

    def report(results: list[Result]) -> str:
        return table(benchlib.medians(results, names, lambda r: r.rate), results)

    server = "Go crypto/tls server" if args.server == "go" else "openssl s_server"
    heading = (f"openssl s_time -new x{args.clients} (client ns) -> {server} (pod), "
               f"{args.seconds}s per run{f', median of {args.repeat}' if args.repeat > 1 else ''}"
               f"; keytap on the pod's veth"
               + (f"; server and load on CPUs {args.pod_cpus}, keytap on the others"
                  if args.pod_cpus else ""))
    return benchlib.run("bench_handshakes", ("ip", "openssl"), args.dir, rounds, heading, report)


if __name__ == "__main__":
    sys.exit(main())
