"""Compare iperf3 throughput with no capture, with tcpdump and with keytap on the pod's veth.

Not a test (numbers depend on the machine). Needs root, BCC, tcpdump and iperf3; builds the lab
network of keytap/labnet.py (client ns -> node ns -> pod ns) and removes it when done, also
on Ctrl-C. Run from anywhere:

    sudo .venv/bin/python tools/bench_capture.py [--seconds 10] [--workloads bulk,udp64]
        [--udp-rates 50k,100k,150k] [--repeat N] [--keytap-arg=--no-tls]

Workloads (client -> pod, iperf3 against a server in the pod namespace):
  bulk   TCP, default writes: few, large (GSO) packets. A run of 10 s ends before tcpdump's
         file passes the kernel's dirty limits (~3.5 GB here; its pages go with the file
         after the run), so tcpdump is not throttled inside it: --seconds 30 shows the
         sustained case (docs/DESIGN.md, "Reading the packet ring")
  udp64  UDP, 64-byte datagrams, unlimited rate: many small packets at a constant size
  udp64@RATE  the same at an offered RATE of datagrams per second (--udp-rates adds these):
         the last line names each capturer's highest rate seen in a udp64 run without a loss
  tcp64  (not run by default) TCP with 64-byte writes, TCP_NODELAY and autocorking off in the
         client ns: small segments only while the sender is the bottleneck; once a capturer
         slows the path, the writes pile up and leave as large segments, so the packet count
         differs between capturers and the throughput ratio compares different workloads

For each capturer: throughput relative to no capture, what it saw, wrote and lost. tcpdump's
numbers are its own report on SIGINT ("received by filter" = saw, "captured" = wrote, "dropped
by kernel" = lost), keytap's its summary; seen/s is seen divided by --seconds; CPU s is the
capturer's own CPU time during the load (the kernel's work in the sender's context, copying
into the capturer's ring, is not in it). Capture files go
to a temporary directory (override with --dir) and are deleted after each run, their size
reported. Results go to standard output, progress to standard error.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import benchlib

from keytap.demo.labnet import Lab

PORT = 5201
WORKLOADS: dict[str, list[str]] = {  # iperf3 client arguments
    "bulk": [],
    "tcp64": ["-l", "64", "-N"],
    "udp64": ["-u", "-b", "0", "-l", "64"],
}
# Without this, TCP autocorking merges the small writes into large segments whenever one is
# still queued (always, here): -l 64 alone gives packets of ~1.5 KB on average, not ~110 bytes.
AUTOCORKING = {"tcp64": "0"}
UDP64_BITS = 64 * 8  # iperf3's -b counts payload bits
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
class Result(benchlib.Run):
    """One iperf3 run under one capturer."""

    workload: str
    capturer: str
    bps: float = 0.0
    udp_lost_percent: float | None = None
    seen: int | None = None
    written: int | None = None
    dropped: int | None = None
    file_bytes: int | None = None
    cpu_s: float | None = None  # the capturer's CPU time during the load (user + system)


def iperf_arguments(workload: str) -> list[str]:
    """iperf3's client arguments: udp64@RATE is udp64 with -b set for RATE datagrams/s."""
    base, _, rate = workload.partition("@")
    arguments = list(WORKLOADS[base])
    if rate:
        arguments[arguments.index("-b") + 1] = str(rate_per_second(rate) * UDP64_BITS)
    return arguments


def rate_per_second(text: str) -> int:
    """100k, 1.5M, 20000: a rate."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def highest_lossless(results: list[Result], seconds: int) -> str:
    """Per capturer, the highest rate of 64-byte datagrams it saw in a udp64 run (offered
    rate or unlimited) in which it lost none."""
    best: dict[str, int] = {}
    for r in results:
        if (r.workload.partition("@")[0] == "udp64" and r.capturer != "none"
                and r.error is None and r.dropped == 0 and r.seen):
            best[r.capturer] = max(best.get(r.capturer, 0), round(r.seen / seconds))
    tcpdump, keytap = best.get("tcpdump"), best.get("keytap")
    ratio = f" (x{keytap / tcpdump:.2f})" if tcpdump and keytap else ""
    return ("64-byte UDP, the highest rate seen in a run without a loss: "
            f"tcpdump {fmt_count(tcpdump)}/s, keytap {fmt_count(keytap)}/s{ratio}")


def names(result: Result) -> tuple[str, str]:
    """What a run measured and with what capture: its group for medians, its row's names."""
    return result.workload, result.capturer


def stop_for_stderr(process: subprocess.Popen, log: Path) -> str:
    """Stop it as a user would, then all it wrote to stderr (its own counts are there)."""
    if benchlib.stop(process):
        return log.read_text(errors="replace")
    note = f"\n(killed: still running {benchlib.STOP_TIMEOUT_S:.0f}s after SIGINT)"
    return log.read_text(errors="replace") + note


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
            "-t", str(self.seconds), "-J", *iperf_arguments(workload),
            stdout=subprocess.PIPE, text=True)
        try:
            out, err = client.communicate(timeout=self.seconds + 60)
        finally:
            benchlib.forget(self.lab, client)
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
            if capturer == "tcpdump":
                with log.open("w") as stderr:
                    process = self.lab.spawn(
                        self.lab.node, "tcpdump", "-i", self.lab.pod_veth, "-s", "262144",
                        "-B", "262144", "--immediate-mode", "-w", str(output), stderr=stderr)
                benchlib.wait_for_text(process, log, "listening on", 30)
            elif capturer == "keytap":
                process = benchlib.spawn_keytap(self.lab, log, "-o", str(output), *self.keytap_args)
                benchlib.wait_until_capturing(process, log)
            before = benchlib.cpu_s(process) if process is not None else 0.0
            report = self.iperf(workload)
            if process is not None:
                result.cpu_s = benchlib.cpu_s(process) - before
                self._account(result, stop_for_stderr(process, log))
                benchlib.forget(self.lab, process)
                process = None
            self._throughput(result, report)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            result.error = benchlib.last_line(str(error))[:120]
        finally:
            if process is not None:  # failed or interrupted
                benchlib.discard(self.lab, process)
            if output.exists():
                result.file_bytes = output.stat().st_size
                output.unlink()
            log.unlink(missing_ok=True)
        return result

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
                raise RuntimeError(f"no keytap summary: {benchlib.last_line(stderr)}")
            result.seen, result.written, result.dropped = (
                int(match[k]) for k in ("seen", "written", "dropped"))
        else:
            counts = {k: first_int(p, stderr) for k, p in TCPDUMP_COUNTS.items()}
            if counts["seen"] is None:
                raise RuntimeError(f"no tcpdump statistics: {benchlib.last_line(stderr)}")
            result.seen, result.written, result.dropped = (
                counts["seen"], counts["written"], counts["dropped"])


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
              "written", "wr/seen", "dropped", "file MB", "CPU s")
    baseline = benchlib.baselines(results, names, lambda r: r.bps)

    def cells(r: Result) -> tuple[str, ...]:
        base = baseline.get(r.workload)
        return (
            f"{r.bps / 1e9:.3f}",
            f"{r.udp_lost_percent:.1f}%" if r.udp_lost_percent is not None else "",
            f"{r.bps / base:.2f}" if base and r.capturer != "none" else "",
            fmt_count(r.seen),
            fmt_count(round(r.seen / seconds)) if r.seen is not None else "-",
            fmt_count(r.written),
            f"{100 * r.written / r.seen:.1f}%" if r.seen and r.written is not None else "-",
            fmt_count(r.dropped),
            f"{r.file_bytes / 1e6:.0f}" if r.file_bytes is not None else "-",
            f"{r.cpu_s:.1f}" if r.cpu_s is not None else "-",
        )

    return benchlib.comparison(header, results, names, cells)


def parse_args() -> argparse.Namespace:
    parser = benchlib.argument_parser(__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="iperf3 -t per run (default 10)")
    parser.add_argument("--workloads", default="bulk,udp64",
                        help=f"comma-separated, from {','.join(WORKLOADS)} (default bulk,udp64)")
    parser.add_argument("--udp-rates", default="",
                        help="comma-separated offered rates of 64-byte datagrams/s, e.g. "
                             "50k,100k,150k: adds a udp64@RATE workload each")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every run, interleaved; the median run is shown")
    benchlib.add_dir_argument(parser)
    parser.add_argument("--keytap-arg", dest="keytap_args", action="append", default=[],
                        metavar="ARG", help="extra keytap argument, e.g. --keytap-arg=--no-tls")
    args = parser.parse_args()
    args.workloads = benchlib.choices(parser, args.workloads, WORKLOADS, "workload")
    try:
        rates = [rate_per_second(rate) for rate in args.udp_rates.split(",") if rate]
    except ValueError:
        parser.error(f"--udp-rates: not a list of rates: {args.udp_rates}")
    if any(rate <= 0 for rate in rates):
        parser.error("--udp-rates must be positive")
    args.workloads += [f"udp64@{rate}" for rate in rates]
    if args.seconds <= 0 or args.repeat <= 0:
        parser.error("--seconds and --repeat must be positive")
    return args


def main() -> int:
    args = parse_args()

    def rounds(lab: Lab, directory: Path, results: list[Result]) -> None:
        bench = Bench(lab, args.seconds, directory, args.keytap_args)
        bench.start_server()
        runs = benchlib.interleaved(args.repeat, args.workloads, CAPTURERS)
        for round_, workload, capturer in runs:
            print(f"bench_capture: round {round_}/{args.repeat}: {workload} with "
                  f"{capturer} ...", file=sys.stderr)
            results.append(bench.run(workload, capturer))

    def report(results: list[Result]) -> str:
        text = table(benchlib.medians(results, names, lambda r: r.bps), args.seconds)
        if any(workload.startswith("udp64") for workload in args.workloads):
            text += "\n" + highest_lossless(results, args.seconds)
        return text

    heading = (f"iperf3 client -> pod, {args.seconds}s per run"
               f"{f', median of {args.repeat}' if args.repeat > 1 else ''}; capture on the pod's "
               f"veth")
    return benchlib.run("bench_capture", ("ip", "iperf3", "tcpdump"), args.dir, rounds, heading,
                        report)


if __name__ == "__main__":
    sys.exit(main())
