"""Handshakes/s of a captured pod over those of its twin, measured over the same seconds.

Not a test (numbers depend on the machine). Needs root, BCC and openssl. Two lab pods (two
keytap/labnet.py labs) run the same TLS server, `openssl s_server` or with `--server go` the
lab's Go peer, under the same load: `--clients` parallel `openssl s_time -new` each, all of it
pinned to `--pod-cpus` (default 0); keytap runs on the other CPUs, on one pod's veth, the pods
taking turns round by round. The scheduler shares the pods' CPUs between the two loads, so
the captured pod's rate over its twin's is what keytap costs the pod itself (the probes' traps,
the BPF programs, the classifier), and the machine's drift (its speed wanders by 10-20% from
minute to minute here) hits both alike: a steadier figure than bench_handshakes.py's rounds
one after the other. keytap's own CPU is not in it: it has CPUs of its own, as on a node with
CPU to spare; bench_handshakes.py without --pod-cpus measures the shared case.

Each server runs from a copy of its file of its own (the Go peer; s_server's libssl), so the
twin keytap does not capture has no uprobe at all: uprobes are per file, and keytap probes the
files of the processes in its scope. `none` (no keytap) shows what the method itself gives.

    sudo .venv/bin/python tools/bench_twins.py [--server go] [--repeat 10] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import benchlib
from bench_handshakes import CAPTURES, Bench, load_args, load_parser

from keytap.demo.labnet import Lab


@dataclass
class Twins(benchlib.Run):
    """One round of one way: the captured pod's rate and its twin's."""

    version: str
    capture: str
    captured: float = 0.0
    twin: float = 0.0
    sessions: int | None = None  # TLS sessions keytap saw on the captured pod's veth
    with_keys: int | None = None  # ... and wrote keys for

    @property
    def ratio(self) -> float:
        return self.captured / self.twin if self.twin else 0.0


def twin_bench(lab: Lab, directory: Path, args: argparse.Namespace) -> Bench:
    """A pod of the pair, its server started from a file of its own, in a directory of its
    own."""
    bench = Bench(lab, args.seconds, args.clients, directory / lab.pod, args.server,
                  args.pod_cpus, args.keytap_cpus)
    bench.directory.mkdir()
    bench.start_server(own_copy=True)
    return bench


def measure(benches: tuple[Bench, Bench], version: str, capture: str, round_: int) -> Twins:
    """Both loads at once, keytap (if any) on the pod whose turn it is."""
    result = Twins(version, capture)
    captured, twin = benches if round_ % 2 else benches[::-1]
    log, output = captured.directory / "keytap.stderr", captured.directory / "c.pcapng"
    summary = captured.directory / "summary.json"
    process = None
    try:
        keytap_args = CAPTURES[capture]
        if keytap_args is not None:
            process = benchlib.spawn_keytap(captured.lab, log, "-o", str(output),
                                            "--summary-json", str(summary), *keytap_args,
                                            cpus=captured.keytap_cpus)
            benchlib.wait_until_capturing(process, log)
        loads = (captured.load_started(version), twin.load_started(version))
        done = (captured.load_done(loads[0]), twin.load_done(loads[1]))
        result.captured, result.twin = (d.connections / d.elapsed_s for d in done)
        if process is not None:
            benchlib.stop(process)
            tls = json.loads(summary.read_text()).get("tls", {})
            result.sessions, result.with_keys = (tls.get("sessions_seen"),
                                                 tls.get("sessions_with_keys"))
    except (RuntimeError, OSError, ValueError) as error:
        result.error = benchlib.last_line(str(error))[:120]
    finally:
        if process is not None:
            benchlib.stop(process)
            benchlib.forget(captured.lab, process)
        for path in (log, output, summary):
            path.unlink(missing_ok=True)
    return result


def report(results: list[Twins]) -> str:
    header = ("TLS", "keytap", "captured/twin", "its range", "rounds", "handshakes/s (captured)",
              "sessions with keys")
    rows = [header]
    for version in dict.fromkeys(r.version for r in results):
        for capture in dict.fromkeys(r.capture for r in results):
            runs = [r for r in results if (r.version, r.capture) == (version, capture)
                    and not r.error]
            if not runs:
                continue
            ratios = sorted(r.ratio for r in runs)
            keys = [(r.with_keys, r.sessions) for r in runs if r.sessions is not None]
            rows.append((version, capture, f"{statistics.median(ratios):.3f}",
                         f"{ratios[0]:.3f}-{ratios[-1]:.3f}", str(len(runs)),
                         f"{statistics.median(r.captured for r in runs):.0f}",
                         f"{sum(k for k, _ in keys)}/{sum(n for _, n in keys)}" if keys
                         else "-"))
    errors = [f"{r.version} {r.capture}: {r.error}" for r in results if r.error]
    return "\n".join(benchlib.render(rows) + errors)


def parse_args() -> argparse.Namespace:
    parser = load_parser(__doc__, seconds=4, repeat=10)
    parser.add_argument("--pod-cpus", metavar="LIST", default="0",
                        help="the pods' and their loads' CPUs (default 0); keytap: the others")
    return load_args(parser)


def main() -> int:
    args = parse_args()

    def rounds(lab: Lab, directory: Path, results: list[Twins]) -> None:
        other = Lab(index=1)
        try:
            other.create()
            benches = (twin_bench(lab, directory, args), twin_bench(other, directory, args))
            for round_, version, capture in benchlib.interleaved(args.repeat, args.versions,
                                                                args.ways):
                result = measure(benches, version, capture, round_)
                results.append(result)
                print(f"bench_twins: round {round_}/{args.repeat}: TLS {version}, keytap "
                      f"{capture}: {result.error or f'{result.ratio:.3f}'}", file=sys.stderr)
        finally:
            other.destroy()

    server = "Go crypto/tls server" if args.server == "go" else "openssl s_server"
    heading = (f"two pods, each a {server} under openssl s_time -new x{args.clients}, "
               f"{args.seconds}s per run, {args.repeat} rounds; pods and loads on CPUs "
               f"{args.pod_cpus}, keytap on {args.keytap_cpus}, on one pod's veth in turn")
    return benchlib.run("bench_twins", ("ip", "openssl", "taskset"), args.dir, rounds, heading,
                        report)


if __name__ == "__main__":
    sys.exit(main())
