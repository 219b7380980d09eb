"""Process starts in a pod with no keytap, keytap --no-tls and keytap: what the launch gate costs.

Not a test (numbers depend on the machine). Needs root, BCC, curl and openssl; builds the lab
network of keytap/labnet.py and removes it when done, also on Ctrl-C. Run from anywhere:

    sudo .venv/bin/python tools/bench_starts.py [--true 1000] [--clients 200] [--repeat 2]

Where tools/bench_launches.py times the launch gate alone, this times whole keytap captures on
the pod's veth, as a user runs them. Three workloads, each a new process started in the pod
one after the other (posix_spawn and wait, from a driver in the pod): /bin/true, a one-shot TLS
client (curl to `openssl s_server -www` outside the pod: a handshake and a request, keytap's
uprobes in curl's libssl), and the same client loading a libssl file new to keytap at every
start (each start held until that file is inspected and probed: the gate's worst case). Ways,
interleaved in every round, median of --repeat shown:

  none    no keytap
  no-tls  keytap --no-tls: packets only, no probes, no gate
  tls     keytap as by default: probes, the launch gate, every session checked

keytap's columns come from its --summary-json: TLS sessions on the wire and with keys, and the
launch gate's holds (how many opens it held until their file was inspected, p50/p99); "start s"
is from its start to "capturing" (compiling and attaching; target 2 s, issue 16), "stop s" from
SIGINT to its exit, which detaching its uprobes dominates.
Targets (issue 12): /bin/true at >= 0.9x of no keytap, held p99 <= 5 ms.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib
from bench_launches import DRIVER

from keytap.demo.labnet import Lab

PORT = 4433
STOP_TIMEOUT_S = 900.0  # ~0.1 s per uprobe to detach here: 200 new libssl files, ~7 each
LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
WAYS: dict[str, list[str] | None] = {"none": None, "no-tls": ["--no-tls"], "tls": []}


@dataclass
class Result(benchlib.Run):
    """One workload's starts under one way of capturing."""

    workload: str
    way: str
    starts_per_s: float = 0.0
    sessions_seen: int | None = None
    sessions_with_keys: int | None = None
    held: int | None = None
    held_p50_ms: float | None = None
    held_p99_ms: float | None = None
    start_s: float | None = None  # from its start to "capturing": compiling, attaching
    stop_s: float | None = None  # SIGINT to exit: detaching every uprobe it attached


def names(result: Result) -> tuple[str, str]:
    return result.workload, result.way


def workloads(lab: Lab, directory: Path, trues: int, clients: int
              ) -> dict[str, tuple[int, list[str]]]:
    """workload -> (starts, command). "curl, new libssl": each start loads a libssl file no
    process loaded before (a copy, through LD_LIBRARY_PATH), which the gate holds until its
    probes are attached: the worst case, once per new file."""
    curl = ["/usr/bin/curl", "-skf", "-o", "/dev/null", f"https://{lab.client_ip}:{PORT}/"]
    for index in range(clients):
        copy = directory / "libs" / str(index)
        copy.mkdir(parents=True)
        shutil.copy2(LIBSSL, copy / LIBSSL.name)
    counter = directory / "libs" / "next"  # set to 0 by each run (measure)
    # the next copy's directory, by a counter the starts share (one after the other)
    each_new = ('n=$(cat "$0"); echo $((n + 1)) > "$0"; '
                'LD_LIBRARY_PATH="${0%/next}/$n" exec "$@"')
    return {"/bin/true": (trues, ["/bin/true"]),
            "curl (TLS 1.3)": (clients, curl),
            "curl, new libssl": (clients, ["/bin/sh", "-c", each_new, str(counter), *curl])}


def measure(lab: Lab, directory: Path, way: str, workload: str, count: int,
            command: list[str]) -> Result:
    result = Result(workload, way)
    summary, log = directory / "summary.json", directory / "keytap.stderr"
    process = None
    try:
        if WAYS[way] is not None:
            starting = time.monotonic()
            process = benchlib.spawn_keytap(lab, log, "-o", str(directory / "c.pcapng"),
                                            "--summary-json", str(summary), *WAYS[way])
            benchlib.wait_until_capturing(process, log)
            result.start_s = time.monotonic() - starting
        counter = directory / "libs" / "next"
        counter.write_text("0")  # each run starts from the first copy: new to this keytap
        done = lab.run(lab.pod, sys.executable, "-c", DRIVER, str(count), *command)
        result.starts_per_s = count / float(done.stdout)
        if process is not None:
            stopping = time.monotonic()
            if not benchlib.stop(process, STOP_TIMEOUT_S):
                raise RuntimeError(f"keytap still running {STOP_TIMEOUT_S:.0f}s after SIGINT")
            result.stop_s = time.monotonic() - stopping
            benchlib.forget(lab, process)
            process = None
            tls = json.loads(summary.read_text()).get("tls", {})
            result.sessions_seen = tls.get("sessions_seen")
            result.sessions_with_keys = tls.get("sessions_with_keys")
            gate = tls.get("launch_gate") or {}
            result.held = gate.get("held")
            result.held_p50_ms, result.held_p99_ms = gate.get("held_p50_ms"), gate.get(
                "held_p99_ms")
    except (RuntimeError, subprocess.CalledProcessError, OSError, ValueError) as error:
        result.error = benchlib.last_line(str(error))[:120]
    finally:
        if process is not None:
            benchlib.discard(lab, process)
        for path in (summary, log, directory / "c.pcapng"):
            path.unlink(missing_ok=True)
    return result


def fmt(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(chosen: list[Result]) -> str:
    header = ("workload", "keytap", "starts/s", "vs none", "TLS sessions", "with keys", "held",
              "held p50 ms", "held p99 ms", "start s", "stop s")
    baseline = benchlib.baselines(chosen, names, lambda r: r.starts_per_s)

    def cells(r: Result) -> tuple[str, ...]:
        base = baseline.get(r.workload)
        return (f"{r.starts_per_s:.1f}",
                f"{r.starts_per_s / base:.3f}" if base and r.way != "none" else "",
                fmt(r.sessions_seen), fmt(r.sessions_with_keys), fmt(r.held),
                fmt(r.held_p50_ms, ".2f"), fmt(r.held_p99_ms, ".2f"), fmt(r.start_s, ".1f"),
                fmt(r.stop_s, ".1f"))

    return benchlib.comparison(header, chosen, names, cells)


def main() -> int:
    parser = benchlib.argument_parser(__doc__)
    parser.add_argument("--true", type=int, default=1000, help="starts of /bin/true per run")
    parser.add_argument("--clients", type=int, default=200, help="starts of curl per run")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds")
    benchlib.add_dir_argument(parser)
    args = parser.parse_args()
    if min(args.true, args.clients, args.repeat) <= 0:
        parser.error("--true, --clients and --repeat must be positive")

    def rounds(lab: Lab, directory: Path, results: list[Result]) -> None:
        benchlib.start_tls_server(lab, directory, PORT, "-www", "-quiet", outside=True)
        each = workloads(lab, directory, args.true, args.clients)
        for round_, workload, way in benchlib.interleaved(args.repeat, list(each), list(WAYS)):
            print(f"bench_starts: round {round_}/{args.repeat}: {workload}, keytap {way} ...",
                  file=sys.stderr)
            results.append(measure(lab, directory, way, workload, *each[workload]))
            print(f"bench_starts:   {results[-1].error or f'{results[-1].starts_per_s:.1f}/s'}",
                  file=sys.stderr)

    def report(results: list[Result]) -> str:
        return table(benchlib.medians(results, names, lambda r: r.starts_per_s))

    heading = (f"process starts in the pod, one after the other ({args.true} /bin/true, "
               f"{args.clients} curl), median of {args.repeat}; keytap on the pod's veth")
    return benchlib.run("bench_starts", ("ip", "openssl", "curl"), args.dir, rounds, heading,
                        report)


if __name__ == "__main__":
    sys.exit(main())
