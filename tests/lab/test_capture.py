"""Issue 2: packets from veth interfaces into a Wireshark-ready pcapng, judged by tshark."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
from collections import Counter
from pathlib import Path

from keytap.demo.labnet import Lab
from tests.support import tshark

BODY_SIZE = 5 * 1024 * 1024
PORT = 8000


def start_tcpdump(lab: Lab, output: Path) -> subprocess.Popen:
    process = lab.spawn(lab.node, "tcpdump", "-i", lab.pod_veth, "-s", "262144", "-B", "262144",
                        "--immediate-mode", "-U", "-w", str(output), text=True)
    line = process.stderr.readline()  # "listening on ..." once the socket is bound
    assert "listening on" in line, line
    return process


def serve_directory(lab: Lab, directory: Path) -> None:
    lab.spawn(lab.pod, "/usr/bin/python3", "-m", "http.server", str(PORT), "--bind", lab.pod_ip,
              "--directory", str(directory))
    lab.wait_for_port(lab.pod, PORT, lab.pod_ip)


def flow_packets(capture: Path) -> list[list[str]]:
    return tshark.fields(capture, "frame.len", "eth.src", "eth.dst",
                         "frame.packet_flags_direction", display_filter=f"tcp.port == {PORT}")


def test_http_body_counts_and_directions_match_tcpdump(lab: Lab, keytap, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    body = os.urandom(BODY_SIZE)
    (www / "body.bin").write_bytes(body)
    serve_directory(lab, www)
    tcpdump = start_tcpdump(lab, tmp_path / "tcpdump.pcap")
    output = tmp_path / "keytap.pcapng"
    capture = keytap("capture", "-i", lab.pod_veth, "-o", str(output)).start()

    lab.run(lab.client, "curl", "-sf", "-o", str(tmp_path / "got.bin"),
            f"http://{lab.pod_ip}:{PORT}/body.bin")
    assert capture.stop() == 0, capture.stderr
    tcpdump.send_signal(signal.SIGINT)
    _, tcpdump_report = tcpdump.communicate(timeout=30)
    assert re.search(r"^0 packets dropped by kernel", tcpdump_report, re.M), tcpdump_report

    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    # two GSO segments handled on two CPUs can reach the classifier in the other order
    exported = tshark.export_http_objects(output, tmp_path / "objects",
                                          ("-o", "tcp.reassemble_out_of_order:TRUE"))
    assert [p.read_bytes() == body for p in exported] == [True], [p.name for p in exported]

    ours, theirs = flow_packets(output), flow_packets(tmp_path / "tcpdump.pcap")
    assert len(ours) == len(theirs) > 100
    assert Counter(int(row[0]) for row in ours) == Counter(int(row[0]) for row in theirs)
    assert max(int(row[0]) for row in ours) > 1514, "GSO super-packets must be captured whole"
    pod_mac = lab.mac(lab.pod, "eth0")
    inbound = [row for row in ours if int(row[3], 16) == 1]
    outbound = [row for row in ours if int(row[3], 16) == 2]
    assert len(inbound) + len(outbound) == len(ours)
    assert all(row[1] == pod_mac for row in inbound)  # ingress of the host veth: from the pod
    assert all(row[2] == pod_mac for row in outbound)
    assert len(inbound) == sum(row[1] == pod_mac for row in theirs)

    summary = re.search(r"(\d+) packets seen by the classifier, (\d+) written, (\d+) dropped",
                        capture.stderr)
    assert summary, capture.stderr
    seen, written, dropped = map(int, summary.groups())
    assert seen == written + dropped and dropped == 0
    assert written == int(subprocess.run(["capinfos", "-Mc", str(output)], capture_output=True,
                                         text=True, check=True).stdout.split()[-1])


def test_interface_description_and_both_directions_on_two_interfaces(
        lab: Lab, keytap, tmp_path: Path) -> None:
    output = tmp_path / "two.pcapng"
    capture = keytap("capture", "-i", lab.pod_veth, "-i", lab.client_veth, "-o", str(output)
                     ).start()
    lab.run(lab.client, "ping", "-c", "3", "-i", "0.2", lab.pod_ip)
    assert capture.stop() == 0, capture.stderr
    rows = tshark.fields(output, "frame.interface_name", "frame.packet_flags_direction",
                         display_filter="icmp")
    # each echo request and reply crosses both veths: 3 x 2 messages x 2 interfaces
    assert Counter((name, int(d, 16)) for name, d in rows) == {
        (lab.client_veth, 1): 3, (lab.client_veth, 2): 3,
        (lab.pod_veth, 1): 3, (lab.pod_veth, 2): 3}


def test_count_and_snaplen(lab: Lab, keytap, tmp_path: Path) -> None:
    """-c stops after COUNT written packets; -s keeps SNAPLEN bytes and the wire length."""
    output = tmp_path / "short.pcapng"
    capture = keytap("capture", "-i", lab.pod_veth, "-o", str(output), "-c", "4", "-s", "60"
                     ).start()
    lab.run(lab.client, "ping", "-c", "6", "-i", "0.1", "-s", "500", lab.pod_ip)
    assert capture.wait() == 0, capture.stderr
    rows = tshark.fields(output, "frame.len", "frame.cap_len")
    assert len(rows) == 4
    assert all(int(cap) == min(int(length), 60) for length, cap in rows)  # ARP may come first
    assert any(int(length) > 500 for length, _ in rows)
    summary = re.search(r"(\d+) packets seen by the classifier, (\d+) written, (\d+) dropped",
                        capture.stderr)
    assert summary, capture.stderr
    seen, written, dropped = map(int, summary.groups())
    assert written == 4 and seen == written + dropped
