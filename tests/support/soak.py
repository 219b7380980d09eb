"""A mixed load through the lab pod for a while, with keytap's memory and fds sampled.

Shared by the 60-second lab test (tests/lab/test_soak.py) and the on-demand 10-minute run
(tools/soak.py). The load, all at once, from the client namespace to the pod: bulk TCP
(iperf3 at a fixed bit rate, so the file stays a size a disk holds), small UDP datagrams
(iperf3 -u -l 64) and a new HTTPS connection every CONNECT_INTERVAL_S to the pod's Python
server (its own key log: every session's keys). keytap's /proc/PID/status (VmRSS, RssAnon)
and open fds, its children's included, are sampled every `interval_s`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from keytap.demo.labnet import Lab
from tests.support import tls_lab

TLS_PORT, BULK_PORT, SMALL_PORT = 4433, 5201, 5202
BULK_RATE, SMALL_RATE = "20M", "2M"  # iperf3 -b
CONNECT_INTERVAL_S = 0.1
CONNECTOR = """
import socket, ssl, sys, time
host, port, keylog, seconds, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], \\
    float(sys.argv[4]), float(sys.argv[5])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
context.keylog_filename = keylog
done, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    with context.wrap_socket(socket.create_connection((host, port), timeout=10)) as tls:
        tls.sendall(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
        while tls.recv(65536):
            pass
    done += 1
    time.sleep(interval)
print(done)
"""


@dataclass(frozen=True)
class Sample:
    at_s: float
    rss_kb: int
    rss_anon_kb: int
    fds: int


@dataclass
class SoakResult:
    samples: list[Sample] = field(default_factory=list)
    connections: int = 0  # HTTPS connections the client completed

    def growth_kb(self, attribute: str, after_fraction: float) -> int:
        """How much `attribute` grew from the first sample after `after_fraction` of the run
        (warm-up: bounded caches filling) to the largest after it."""
        start = self.samples[-1].at_s * after_fraction
        later = [getattr(s, attribute) for s in self.samples if s.at_s >= start]
        return max(later) - later[0]


def start_servers(lab: Lab, directory: Path) -> None:
    www = directory / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("soak\n")
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, TLS_PORT,
                                tls_lab.make_certificate(directory), directory / "server.keys",
                                www, stderr=subprocess.DEVNULL)
    for port in (BULK_PORT, SMALL_PORT):
        lab.spawn(lab.pod, "iperf3", "-s", "-B", lab.pod_ip, "-p", str(port),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.wait_for_port(lab.pod, port, lab.pod_ip)


def run_load(lab: Lab, directory: Path, keytap_pid: int, seconds: float,
             interval_s: float) -> SoakResult:
    """The load for `seconds`, sampling keytap meanwhile; returns when the load is done."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # no pipe to fill
    load = [
        lab.spawn(lab.client, "iperf3", "-c", lab.pod_ip, "-p", str(BULK_PORT), "-b", BULK_RATE,
                  "-t", str(int(seconds)), **quiet),
        lab.spawn(lab.client, "iperf3", "-c", lab.pod_ip, "-p", str(SMALL_PORT), "-u", "-l",
                  "64", "-b", SMALL_RATE, "-t", str(int(seconds)), **quiet),
    ]
    connector = lab.spawn(lab.client, sys.executable, "-c", CONNECTOR, lab.pod_ip,
                          str(TLS_PORT), str(directory / "client.keys"), str(seconds),
                          str(CONNECT_INTERVAL_S), stdout=subprocess.PIPE, text=True)
    result, start = SoakResult(), time.monotonic()
    while connector.poll() is None:
        result.samples.append(sample(keytap_pid, time.monotonic() - start))
        time.sleep(interval_s)
    for process in load:  # they end with the connector; one that hangs on its report goes
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(timeout=15)
    out, err = connector.communicate()
    if connector.returncode != 0:
        raise RuntimeError(f"the HTTPS client failed: {err.strip().splitlines()[-1:]}")
    result.connections = int(out)
    result.samples.append(sample(keytap_pid, time.monotonic() - start))
    return result


def sample(pid: int, at_s: float) -> Sample:
    """keytap's memory and fds: its process's and its children's (the launch gate's helper),
    summed."""
    rss = anon = fds = 0
    for each in (pid, *children(pid)):
        try:
            status = dict(line.split(":", 1) for line in
                          Path(f"/proc/{each}/status").read_text().splitlines() if ":" in line)
            rss += int(status["VmRSS"].split()[0])
            anon += int(status["RssAnon"].split()[0])
            fds += len(os.listdir(f"/proc/{each}/fd"))
        except (OSError, KeyError):
            continue  # a child that just ended
    return Sample(round(at_s, 1), rss, anon, fds)


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(child) for task in tasks.iterdir()
            for child in (task / "children").read_text().split()]

