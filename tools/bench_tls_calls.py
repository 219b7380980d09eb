"""Round trips over one long-lived TLS connection with no keytap, keytap --no-tls and keytap.

Not a test (numbers depend on the machine). Needs root, BCC and openssl; builds the lab
network of keytap/labnet.py and removes it when done, also on Ctrl-C. Run from anywhere:

    sudo .venv/bin/python tools/bench_tls_calls.py [--round-trips 30000] [--repeat 3]

Where tools/bench_handshakes.py times new connections, this times what a chatty connection
(gRPC, a database, HTTP/2) pays for keytap once its keys are out: every SSL_read and SSL_write
hits a uprobe (four a round trip: two on each side), and each packet the classifier. The pod
runs a Python `ssl` echo server (the system libssl); a client outside the pod sends 64-byte
messages and waits for each echo. Ways, interleaved in every round, median of --repeat shown:

  none    no keytap
  no-tls  keytap --no-tls: packets only, no probes
  tls     keytap as by default: probes on the pod's libssl

"pod us/rt" is the echo server's CPU time per round trip: what keytap costs the pod itself.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import benchlib

from keytap.demo.labnet import Lab
from tests.support.tls_lab import make_certificate

PORT = 4433
MESSAGE_BYTES = 64
WAYS: dict[str, list[str] | None] = {"none": None, "no-tls": ["--no-tls"], "tls": []}
# The pod's echo server: one connection, then its CPU seconds on stdout.
SERVER = """
import os, socket, ssl, sys
ip, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
listener = socket.create_server((ip, port))
print("listening", flush=True)
connection = context.wrap_socket(listener.accept()[0], server_side=True)
start = os.times()
while data := connection.recv(65536):
    connection.sendall(data)
end = os.times()
print(end.user + end.system - start.user - start.system, flush=True)
"""
# The client: `count` round trips after a warm-up; their seconds on stdout.
CLIENT = """
import socket, ssl, sys, time
ip, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
connection = context.wrap_socket(socket.create_connection((ip, port)))
message = b"x" * size
def round_trip():
    connection.sendall(message)
    got = 0
    while got < size:
        got += len(connection.recv(65536))
for _ in range(100):
    round_trip()
start = time.perf_counter()
for _ in range(count):
    round_trip()
print(time.perf_counter() - start)
connection.close()
"""


@dataclass
class Result(benchlib.Run):
    """One way of capturing, one round."""

    way: str
    round_trips_per_s: float = 0.0
    pod_us: float | None = None  # the echo server's CPU time per round trip


def names(result: Result) -> tuple[str, str]:
    return "echo", result.way


def measure(lab: Lab, directory: Path, certificate: tuple[Path, Path], way: str,
            count: int) -> Result:
    result = Result(way)
    log, server, process = directory / "keytap.stderr", None, None
    cert, key = certificate
    try:
        if WAYS[way] is not None:
            process = benchlib.spawn_keytap(lab, log, "-o", str(directory / "c.pcapng"),
                                            *WAYS[way])
            benchlib.wait_until_capturing(process, log)
        server = lab.spawn(lab.pod, sys.executable, "-c", SERVER, lab.pod_ip, str(PORT),
                           str(cert), str(key), stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        if server.stdout.readline().strip() != "listening":
            raise RuntimeError("the echo server did not start")
        done = lab.run(lab.client, sys.executable, "-c", CLIENT, lab.pod_ip, str(PORT),
                       str(count), str(MESSAGE_BYTES))
        result.round_trips_per_s = count / float(done.stdout)
        out, _ = server.communicate(timeout=60)
        result.pod_us = float(out.split()[-1]) / (count + 100) * 1e6
        if process is not None and not benchlib.stop(process):
            raise RuntimeError("keytap did not stop")
    except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError,
            ValueError, IndexError) as error:
        result.error = benchlib.last_line(str(error))[:120]
    finally:
        for running in (server, process):
            if running is not None:
                benchlib.discard(lab, running)
        for path in (log, directory / "c.pcapng"):
            path.unlink(missing_ok=True)
    return result


def table(chosen: list[Result]) -> str:
    header = ("connection", "keytap", "round trips/s", "vs none", "pod us/rt")
    baseline = benchlib.baselines(chosen, names, lambda r: r.round_trips_per_s)

    def cells(r: Result) -> tuple[str, ...]:
        base = baseline.get("echo")
        return (f"{r.round_trips_per_s:.0f}",
                f"{r.round_trips_per_s / base:.3f}" if base and r.way != "none" else "",
                "-" if r.pod_us is None else f"{r.pod_us:.1f}")

    return benchlib.comparison(header, chosen, names, cells)


def main() -> int:
    parser = benchlib.argument_parser(__doc__)
    parser.add_argument("--round-trips", type=int, default=30000, help="per run (default 30000)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    benchlib.add_dir_argument(parser)
    args = parser.parse_args()
    if args.round_trips <= 0 or args.repeat <= 0:
        parser.error("--round-trips and --repeat must be positive")

    def rounds(lab: Lab, directory: Path, results: list[Result]) -> None:
        certificate = make_certificate(directory)
        for round_, _, way in benchlib.interleaved(args.repeat, ["echo"], list(WAYS)):
            print(f"bench_tls_calls: round {round_}/{args.repeat}: keytap {way} ...",
                  file=sys.stderr)
            results.append(measure(lab, directory, certificate, way, args.round_trips))
            last = results[-1]
            print(f"bench_tls_calls:   {last.error or f'{last.round_trips_per_s:.0f}/s'}",
                  file=sys.stderr)

    def report(results: list[Result]) -> str:
        return table(benchlib.medians(results, names, lambda r: r.round_trips_per_s))

    heading = (f"{args.round_trips} round trips of {MESSAGE_BYTES} bytes over one TLS 1.3 "
               f"connection, client ns -> Python ssl echo server (pod), median of "
               f"{args.repeat}; keytap on the pod's veth")
    return benchlib.run("bench_tls_calls", ("ip", "openssl"), args.dir, rounds, heading, report)


if __name__ == "__main__":
    sys.exit(main())
