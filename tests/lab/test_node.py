"""Node.js: official builds, their OpenSSL linked into the `node` executable itself (from npm).

Node 16's and 22's are quictls, OpenSSL with QUIC's members added to its SSL struct, under
upstream's version numbers (1.1.1v, 3.0.15): the table's entries for those read them wrong,
and the machine code says so before the first session (tls.candidates); the layout adjusted
to the places the members may have gone in is proven on the wire. Node 24's is OpenSSL 3.5.4.

tshark is the judge: every session, TLS 1.2 and 1.3, decrypts from keytap's file alone, and
keytap's key log equals the one the pod's Node writes through its 'keylog' events. The peer
outside the pod is Node too: its keys are never read. As client, the pod's Node is started
after keytap and handshakes at once.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from tests.support import tls_lab, tshark
from tests.support.node_builds import BUILDS, node_binary
from tests.support.tls_lab import read_keylog

PEER = Path(__file__).parents[1] / "support" / "node_peer.js"
PORT = 8443
SIZE = 3000
BODY = bytes(ord("a") + i % 26 for i in range(SIZE))
VERSIONS = ("1.2", "1.3", "1.2", "1.3")  # a session each
LINES = {"1.2": 1, "1.3": 5}  # key-log lines Node writes per session


@pytest.mark.parametrize("pod_role", ["server", "client"])
@pytest.mark.parametrize("release", list(BUILDS))
def test_node_sessions_decrypt_from_the_file_alone(lab: Lab, keytap, tmp_path: Path,
                                                   release: str, pod_role: str) -> None:
    node = str(node_binary(release))
    openssl = subprocess.run([node, "-p", "process.versions.openssl"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert openssl == BUILDS[release][0]  # the premise
    cert, key = tls_lab.make_certificate(tmp_path)
    roles = tls_lab.PeerRoles.of(lab, tmp_path, pod_role)
    lab.spawn(roles.server_ns, node, str(PEER), "server", roles.server_ip, str(PORT), str(cert),
              str(key), str(roles.server_keys))
    lab.wait_for_port(roles.server_ns, PORT, roles.server_ip)
    capture, keys = tmp_path / "c.pcapng", tmp_path / "keys"
    summary = tmp_path / "summary.json"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--keylog-file",
                     str(keys), "--summary-json", str(summary)).start()
    for version in VERSIONS:
        result = lab.run(roles.client_ns, node, str(PEER), "client",
                         f"https://{roles.server_ip}:{PORT}/bytes/{SIZE}", version,
                         str(roles.client_keys))
        assert f"HTTP 200 {SIZE} bytes" in result.stdout  # the premise
    assert process.stop() == 0, process.stderr
    own = read_keylog(roles.pod_keys)
    assert len(own) == sum(LINES[version] for version in VERSIONS)  # the premise
    assert read_keylog(keys) == own, process.stderr
    report = json.loads(summary.read_text())["tls"]
    assert report["handshakes"] == len(VERSIONS), report  # the outside peer's: never read
    assert report["sessions_with_keys"] == report["sessions_seen"] == len(VERSIONS), report
    assert sum(counts["failed"] + counts["unchecked"]
               for counts in report["verification"].values()) == 0, report
    streams = tshark.follow_tls(capture, range(len(VERSIONS)))
    assert [any(BODY in side for side in sides) for sides in streams] == [True] * len(VERSIONS)
