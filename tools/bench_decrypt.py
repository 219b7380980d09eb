"""At a steady rate of new HTTPS connections: the share tshark decrypts and keytap's added delay.

Not a test (numbers depend on the machine). Needs root, BCC, openssl, ping and tshark; builds
the lab network of keytap/labnet.py (client ns -> node ns -> pod ns) and removes it when done,
also on Ctrl-C. Run from anywhere:

    sudo .venv/bin/python tools/bench_decrypt.py [--rate 1000] [--seconds 10] [--workers 2]
        [--versions 1.3,1.2] [--ping-rate 20]

Per TLS version, one measurement of --seconds:
  - `openssl s_server -WWW` in the pod namespace (system libssl) serves a 2-byte file;
  - --workers generator processes (/usr/bin/python3, asyncio + ssl) in the client namespace
    open new TLS connections on a fixed schedule, --rate per second in all, each one a full
    handshake, `GET /ok HTTP/1.0` and the response. A connection due while --max-inflight are
    still open is skipped, not queued, and a run that falls behind stops at the deadline, so
    "achieved" is the rate that really completed;
  - ping, --ping-rate per second, client -> pod: the steady non-TLS flow;
  - keytap on the pod's veth writes to standard output (`-o -`) into a reader process that
    stores the stream and, for every read from the pipe, the stream offset and time.time_ns().
    Each Enhanced Packet Block's write time is that of the read that completed it; its delay
    is that time minus its timestamp (keytap's kernel time mapped to the wall clock).

Afterwards tshark (-o tcp.reassemble_out_of_order:TRUE, http.desegment_body:FALSE) reads the
stored file alone: a session counts as decrypted when its TCP stream, which has a ClientHello,
shows the decrypted HTTP request and response. Delays are reported for ICMP (the non-TLS flow)
and for the packets of the TLS port (held when a flow waits for its keys). Results go to
standard output, progress to standard error.
"""

from __future__ import annotations

import argparse
import bisect
import json
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib

from keytap.demo.labnet import Lab, sh

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: links the system libssl3 dynamically

PORT = 4433
VERSIONS = ("1.3", "1.2")
SETTLE_S = 3.0  # after the load, before stopping keytap: longer than --key-wait (1.5 s)

# A generator process: its share of the schedule, asyncio connections, a JSON report on stdout.
GENERATOR = r"""
import asyncio, contextlib, json, ssl, sys, time
host, port, version, rate, seconds, index, workers, limit, start = sys.argv[1:]
port, rate, seconds, index, workers, limit = (int(port), float(rate), float(seconds),
                                              int(index), int(workers), int(limit))
start = float(start)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.minimum_version = context.maximum_version = (
    ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2)
REQUEST = b"GET /ok HTTP/1.0\r\n\r\n"
report = {"due": 0, "started": 0, "ok": 0, "failed": 0, "skipped": 0, "missed": 0,
          "errors": {}, "latency_ms": []}
inflight = 0

async def connection():
    global inflight
    began = time.monotonic()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context), 10)
        writer.write(REQUEST)
        answer = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), 10):
                answer += chunk
        if not answer.startswith(b"HTTP/1.0 200"):
            raise RuntimeError("no 200 response")
        report["ok"] += 1
        report["latency_ms"].append(round((time.monotonic() - began) * 1000, 2))
    except Exception as error:
        report["failed"] += 1
        name = type(error).__name__
        report["errors"][name] = report["errors"].get(name, 0) + 1
    finally:
        inflight -= 1
        if writer is not None:
            writer.close()

async def main():
    global inflight
    interval = workers / rate
    first = start + index / rate
    end = start + seconds
    tasks = []
    k = 0
    while (due := first + k * interval) < end:
        k += 1
        report["due"] += 1
        now = time.time()
        if due > now:
            await asyncio.sleep(due - now)
        elif now >= end:  # fell behind: what is left was never attempted
            report["missed"] += 1
            continue
        if inflight >= limit:
            report["skipped"] += 1
            continue
        inflight += 1
        report["started"] += 1
        tasks.append(asyncio.create_task(connection()))
    if tasks:
        await asyncio.wait(tasks, timeout=15)

asyncio.run(main())
json.dump(report, sys.stdout)
"""

# The reader behind keytap's `-o -`: the stream to a file, and per read "offset time_ns".
READER = r"""
import os, sys, time
total = 0
with open(sys.argv[1], "wb") as out, open(sys.argv[2], "w") as marks:
    while chunk := os.read(0, 1 << 20):
        now = time.time_ns()
        out.write(chunk)
        total += len(chunk)
        marks.write(f"{total} {now}\n")
"""

BT_SHB, BT_EPB = 0x0A0D0D0A, 0x00000006
ETH_IPV4 = b"\x08\x00"
IPPROTO_ICMP, IPPROTO_TCP = 1, 6


@dataclass
class Result(benchlib.Run):
    """One measurement at one TLS version."""

    version: str
    generator: dict = field(default_factory=dict)
    client_hellos: int = 0
    decrypted_requests: int = 0
    decrypted_responses: int = 0
    decrypted: int = 0
    delays_ms: dict[str, list[float]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    pings: int = 0


def packet_delays(stream: Path, marks: Path, port: int) -> dict[str, list[float]]:
    """Per class of packet ("non-TLS (ICMP)", "TLS port", "other"), delays in ms."""
    ends, times = [], []
    for line in marks.read_text().splitlines():
        end, now = line.split()
        ends.append(int(end))
        times.append(int(now))
    data = stream.read_bytes()
    delays: dict[str, list[float]] = {"non-TLS (ICMP)": [], f"TLS (tcp/{port})": [], "other": []}
    offset = 0
    while offset + 12 <= len(data):
        block_type, length = struct.unpack_from("<II", data, offset)
        if length < 12 or offset + length > len(data):
            break  # a truncated last block: keytap was killed
        if block_type == BT_EPB:
            high, low, captured = struct.unpack_from("<III", data, offset + 12)
            packet = data[offset + 28:offset + 28 + captured]
            written = times[bisect.bisect_left(ends, offset + length)]
            delays[classify(packet, port)].append((written - ((high << 32) | low)) / 1e6)
        offset += length
    return delays


def classify(packet: bytes, port: int) -> str:
    if len(packet) < 34 or packet[12:14] != ETH_IPV4:
        return "other"
    protocol, header = packet[23], 14 + (packet[14] & 0x0F) * 4
    if protocol == IPPROTO_ICMP:
        return "non-TLS (ICMP)"
    if protocol == IPPROTO_TCP and len(packet) >= header + 4:
        source, destination = struct.unpack_from("!HH", packet, header)
        if port in (source, destination):
            return f"TLS (tcp/{port})"
    return "other"


def decrypted_sessions(result: Result, stream: Path) -> None:
    """ClientHellos per TCP stream, and which of those streams tshark decrypts to HTTP."""
    # http.desegment_body off: s_server's HTTP/1.0 answer has no Content-Length, and over TLS
    # (closed by close_notify) tshark would otherwise wait for the body's end forever
    fields = sh("tshark", "-r", str(stream), "-n", "-o", "tcp.reassemble_out_of_order:TRUE",
                "-o", "http.desegment_body:FALSE", "-Y", "tls.handshake.type == 1 || http",
                "-T", "fields", "-e", "tcp.stream",
                "-e", "tls.handshake.type", "-e", "http.request", "-e", "http.response",
                timeout=600).stdout
    hellos, requests, responses = set(), set(), set()
    for line in fields.splitlines():
        stream_id, types, request, response = [*line.split("\t"), "", "", ""][:4]
        if "1" in types.split(","):
            hellos.add(stream_id)
        if request:
            requests.add(stream_id)
        if response:
            responses.add(stream_id)
    result.client_hellos = len(hellos)
    result.decrypted_requests = len(hellos & requests)
    result.decrypted_responses = len(hellos & responses)
    result.decrypted = len(hellos & requests & responses)


class Bench:
    """The lab, the TLS server, and one measurement per TLS version."""

    def __init__(self, lab: Lab, args: argparse.Namespace, directory: Path) -> None:
        self.lab, self.args, self.directory = lab, args, directory

    def start_server(self) -> None:
        www = self.directory / "www"  # -WWW serves its working directory: only this file in it
        www.mkdir()
        (www / "ok").write_text("ok")
        benchlib.start_tls_server(self.lab, self.directory, PORT, "-WWW", "-quiet", cwd=www)

    def run(self, version: str) -> Result:
        result = Result(version)
        stream = self.directory / f"{version}.pcapng"
        marks = self.directory / f"{version}.marks"
        summary = self.directory / f"{version}.json"
        log = self.directory / f"{version}.stderr"
        started: list[subprocess.Popen] = []
        try:
            keytap = benchlib.spawn_keytap(self.lab, log, "-o", "-", "--summary-json", str(summary),
                                           stdout=subprocess.PIPE)
            started.append(keytap)
            assert keytap.stdout is not None
            reader = self.lab.spawn(self.lab.node, sys.executable, "-c", READER, str(stream),
                                    str(marks), stdin=keytap.stdout, stderr=subprocess.DEVNULL)
            keytap.stdout.close()  # the reader's now: keytap sees EPIPE if the reader dies
            started.append(reader)
            benchlib.wait_until_capturing(keytap, log)
            result.generator, result.pings = self.load(version)
            time.sleep(SETTLE_S)  # every held flow released by the reorder buffer on its own
            keytap.send_signal(signal.SIGINT)
            keytap.wait(timeout=120)
            reader.wait(timeout=60)
            if keytap.returncode != 0:
                raise RuntimeError(f"keytap exited with {keytap.returncode}: "
                                   f"{benchlib.last_line(log.read_text(errors='replace'))}")
            result.summary = json.loads(summary.read_text())
            print(f"bench_decrypt:   {stream.stat().st_size / 1e6:.0f} MB captured; tshark ...",
                  file=sys.stderr)
            result.delays_ms = packet_delays(stream, marks, PORT)
            decrypted_sessions(result, stream)
        except (RuntimeError, AssertionError, subprocess.TimeoutExpired, OSError,
                ValueError) as error:
            result.error = benchlib.last_line(str(error))[:160]
        finally:
            for process in started:
                benchlib.discard(self.lab, process)
            for path in (stream, marks, summary, log):
                path.unlink(missing_ok=True)
        return result

    def load(self, version: str) -> tuple[dict, int]:
        """Generators and ping for --seconds; the generators' merged report, pings answered."""
        args, lab = self.args, self.lab
        start = time.time() + 1.0  # all generators start their schedules together
        ping = lab.spawn(lab.client, "ping", "-n", "-q", "-i", f"{1 / args.ping_rate:.3f}",
                         "-w", f"{args.seconds + 1:.0f}", lab.pod_ip,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        generators = [
            lab.spawn(lab.client, SYSTEM_PYTHON, "-c", GENERATOR, lab.pod_ip, str(PORT), version,
                      str(args.rate), str(args.seconds), str(i), str(args.workers),
                      str(args.max_inflight), f"{start:.6f}",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(args.workers)]
        merged: dict = {"errors": {}, "latency_ms": []}
        try:
            for generator in generators:
                out, err = generator.communicate(timeout=args.seconds + 60)
                if generator.returncode != 0 or not out:
                    raise RuntimeError(f"generator exited with {generator.returncode}: "
                                       f"{benchlib.last_line(err)}")
                for key, value in json.loads(out).items():
                    if key == "errors":
                        for name, count in value.items():
                            merged["errors"][name] = merged["errors"].get(name, 0) + count
                    elif key == "latency_ms":
                        merged["latency_ms"] += value
                    else:
                        merged[key] = merged.get(key, 0) + value
            out, _ = ping.communicate(timeout=args.seconds + 30)
        finally:
            for process in (*generators, ping):
                benchlib.discard(self.lab, process)
        answered = 0
        for line in out.splitlines():  # "N packets transmitted, M received, ..."
            if "received" in line:
                answered = int(line.split(",")[1].split()[0])
        return merged, answered


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def report(results: list[Result], args: argparse.Namespace) -> str:
    lines = []
    good = [r for r in results if not r.error]
    rows: list[tuple[str, ...]] = [("TLS", "target/s", "achieved/s", "ok", "failed", "skipped",
                                    "missed", "conn p50 ms", "ClientHellos", "decrypted",
                                    "share", "keytap: sessions", "with keys", "drops")]
    for r in good:
        g, tls = r.generator, r.summary.get("tls", {})
        latency = g.get("latency_ms") or [0.0]
        rows.append((
            r.version, f"{args.rate:.0f}", f"{g.get('ok', 0) / args.seconds:.0f}",
            str(g.get("ok", 0)), str(g.get("failed", 0)), str(g.get("skipped", 0)),
            str(g.get("missed", 0)), f"{percentile(latency, 0.5):.1f}", str(r.client_hellos),
            str(r.decrypted),
            f"{100 * r.decrypted / r.client_hellos:.2f}%" if r.client_hellos else "-",
            str(tls.get("sessions_seen", "-")), str(tls.get("sessions_with_keys", "-")),
            str(r.summary.get("packets", {}).get("dropped", "-")),
        ))
    if len(rows) > 1:
        lines += benchlib.render(rows, left=1)
    delay_rows: list[tuple[str, ...]] = [("TLS", "packets", "count", "p50 ms", "p95 ms",
                                          "max ms")]
    for r in good:
        for name, values in r.delays_ms.items():
            if not values:
                continue
            delay_rows.append((r.version, name, str(len(values)), f"{percentile(values, 0.5):.1f}",
                               f"{percentile(values, 0.95):.1f}", f"{max(values):.1f}"))
    if len(delay_rows) > 1:
        lines += ["", "added delay: time keytap's -o - delivered the packet minus its timestamp",
                  *benchlib.render(delay_rows, left=2)]
    for r in good:
        notes = []
        if r.decrypted_requests != r.decrypted or r.decrypted_responses != r.decrypted:
            notes.append(f"request decrypted in {r.decrypted_requests}, response in "
                         f"{r.decrypted_responses}")
        if r.generator.get("errors"):
            notes.append(f"generator errors {r.generator['errors']}")
        notes.append(f"pings answered {r.pings}")
        lines.append(f"TLS {r.version}: " + "; ".join(notes))
    lines += [f"TLS {r.version}: FAILED: {r.error}" for r in results if r.error]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = benchlib.argument_parser(__doc__)
    parser.add_argument("--rate", type=float, default=1000,
                        help="new TLS connections per second, all generators (default 1000)")
    parser.add_argument("--seconds", type=int, default=10, help="load per measurement (10)")
    parser.add_argument("--workers", type=int, default=2, help="generator processes (default 2)")
    parser.add_argument("--max-inflight", type=int, default=200,
                        help="open connections per generator before it skips (default 200)")
    parser.add_argument("--ping-rate", type=float, default=20,
                        help="ICMP echo requests per second, the non-TLS flow (default 20)")
    args = benchlib.parse_tls_args(parser, VERSIONS)
    if min(args.rate, args.seconds, args.workers, args.max_inflight, args.ping_rate) <= 0:
        parser.error("--rate, --seconds, --workers, --max-inflight, --ping-rate: positive")
    if args.ping_rate > 500:
        parser.error("--ping-rate: at most 500")
    return args


def main() -> int:
    args = parse_args()

    def measurements(lab: Lab, directory: Path, results: list[Result]) -> None:
        bench = Bench(lab, args, directory)
        bench.start_server()
        for version in args.versions:
            print(f"bench_decrypt: TLS {version}, {args.rate:.0f} connections/s for "
                  f"{args.seconds}s ...", file=sys.stderr)
            results.append(bench.run(version))

    heading = (f"new HTTPS connections (GET, {args.workers} generators, client ns) -> openssl "
               f"s_server -WWW (pod), ping {args.ping_rate:g}/s; keytap -o - on the pod's veth; "
               f"{args.seconds}s per run")
    return benchlib.run("bench_decrypt", ("ip", "openssl", "ping", "tshark", SYSTEM_PYTHON),
                        args.dir, measurements, heading, lambda results: report(results, args))


if __name__ == "__main__":
    sys.exit(main())
