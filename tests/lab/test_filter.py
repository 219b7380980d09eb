"""A pcap-filter expression runs in the classifier: what matches is in the file, nothing else.

tcpdump with the same expression on the same veth is the reference: both files must hold the
same packets, byte for byte. What the classifier rejected never reached keytap and is counted
as filtered, so seen = written + dropped + filtered, in the summary and the statistics blocks.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

from scapy.layers.inet import ICMP
from scapy.utils import rdpcap

from keytap.demo.labnet import Lab
from tests.support import tls_lab
from tests.support.pcapng_blocks import BT_ISB, walk
from tests.support.runner import keytap_command

PORT = 4433
EXPRESSION = f"tcp port {PORT} or icmp"


def start_tcpdump(lab: Lab, output: Path, *expression: str) -> subprocess.Popen:
    process = lab.spawn(lab.node, "tcpdump", "-i", lab.pod_veth, "-s", "262144",
                        "--immediate-mode", "-U", "-w", str(output), *expression, text=True)
    line = process.stderr.readline()  # "listening on ..." once the socket is bound
    assert "listening on" in line, line
    return process


def packets(path: Path) -> Counter[bytes]:
    return Counter(bytes(p) for p in rdpcap(str(path)))


def isb_counters(path: Path) -> list[dict[int, int]]:
    """Each Interface Statistics Block's u64 options (code -> value)."""
    found = []
    for block in walk(path.read_bytes()):
        if block.type != BT_ISB:
            continue
        options, at = {}, 12
        while at + 4 <= len(block.body):
            code, length = int.from_bytes(block.body[at:at + 2], "little"), \
                int.from_bytes(block.body[at + 2:at + 4], "little")
            if code == 0:
                break
            if length == 8 and code not in (2, 3):
                options[code] = int.from_bytes(block.body[at + 4:at + 12], "little")
            at += 4 + (length + 3) // 4 * 4
        found.append(options)
    return found


def test_only_what_the_expression_matches_is_written(lab: Lab, keytap, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("filtered\n")
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT,
                                tls_lab.make_certificate(tmp_path), tmp_path / "server.keys", www)
    tcpdump = start_tcpdump(lab, tmp_path / "tcpdump.pcap", EXPRESSION)
    capture, summary = tmp_path / "c.pcapng", tmp_path / "summary.json"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--summary-json",
                     str(summary), "tcp", "port", str(PORT), "or", "icmp").start()
    lab.run(lab.client, "ping", "-c", "3", "-i", "0.2", lab.pod_ip)
    for index in range(3):
        tls_lab.python_ssl_client(lab, lab.client, lab.pod_ip, PORT, "/index.html",
                                  tls_lab.SESSIONS[0], tmp_path / "client.keys",
                                  tmp_path / f"out-{index}")
    # rejected: UDP to a closed port (its ICMP port-unreachable answers match) and plain TCP
    lab.run(lab.client, "bash", "-c", f"for i in 1 2 3 4 5; do echo x > /dev/udp/{lab.pod_ip}/9;"
            f" done; exec 3<>/dev/tcp/{lab.pod_ip}/9 || true", check=False)
    assert process.stop() == 0, process.stderr
    tcpdump.send_signal(signal.SIGINT)
    _, report = tcpdump.communicate(timeout=30)
    assert re.search(r"^0 packets dropped by kernel", report, re.M), report

    ours, theirs = packets(capture), packets(tmp_path / "tcpdump.pcap")
    assert ours == theirs
    counts = json.loads(summary.read_text())["packets"]
    assert counts["filtered"] >= 5 + 2  # the UDP datagrams, the SYN and its RST at least
    assert counts["seen"] == counts["written"] + counts["dropped"] + counts["filtered"]
    assert counts["written"] == sum(ours.values())
    (isb,) = isb_counters(capture)[-1:]
    assert (isb[4], isb[6], isb[8]) == (counts["seen"], counts["seen"] - counts["filtered"],
                                        counts["written"])


def test_an_invalid_expression_stops_before_anything_is_attached(lab: Lab,
                                                                 tmp_path: Path) -> None:
    capture = tmp_path / "c.pcapng"
    result = lab.run(lab.node, *keytap_command("capture", "-i", lab.pod_veth, "-o", str(capture),
                                               "tcp", "port"), check=False, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "keytap: filter expression 'tcp port': syntax error (the language: man 7 pcap-filter)"
    ], result.stderr
    assert not capture.exists()
    filters = lab.run(lab.node, "tc", "filter", "show", "dev", lab.pod_veth, "ingress").stdout
    assert "keytap" not in filters


def test_a_long_expression_passes_the_verifier(lab: Lab, keytap, tmp_path: Path) -> None:
    expression = ("(tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x16030100 and tcp dst portrange "
                  "400-5000) or (udp and not port 53 and ip[2:2] - ((ip[0] & 0xf) << 2) > 40) "
                  "or (ip6 and (tcp or udp) and not net fd00::/8) or arp or (icmp and len > "
                  "100) or ether broadcast or vlan 7")  # vlan shifts what follows it: last
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(tmp_path / "c.pcapng"),
                     *expression.split()).start()
    lab.run(lab.client, "ping", "-c", "2", "-i", "0.2", "-s", "200", lab.pod_ip)
    assert process.stop() == 0, process.stderr
    written = rdpcap(str(tmp_path / "c.pcapng"))
    assert sum(ICMP in p for p in written) == 4  # the large pings and their answers
