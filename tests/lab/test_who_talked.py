"""Who talked (issue 15): each TLS session's first packet carries a comment naming the process
whose keys decrypt it: pid, command, executable, TLS library and version (frame.comment).

The pod is the client (its processes are in the key scope); each client is its own process,
started in the pod, so that the test knows its pid. `openssl s_client` is a one-shot client
that has exited by the time keytap reads /proc: named by pid and the command the kernel gave
with its keys, its executable unknown.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from keytap.demo.labnet import Lab
from tests.support import tls_lab, tshark
from tests.support.go_builds import go_peer
from tests.support.tls_lab import SYSTEM_PYTHON

PORT = 4433
PYTHON_CLIENT = """
import ssl, sys, time, urllib.request
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
version = ssl.TLSVersion.TLSv1_3 if sys.argv[2] == "1.3" else ssl.TLSVersion.TLSv1_2
context.minimum_version = context.maximum_version = version
urllib.request.urlopen(sys.argv[1], context=context).read()
time.sleep(0.5)  # an application goes on a moment after its request
"""


def test_first_packet_of_each_session_names_the_client(lab: Lab, keytap, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("who?\n")
    cert = tls_lab.make_certificate(tmp_path)
    tls_lab.start_python_server(lab, lab.client, lab.client_ip, PORT, cert,
                                tmp_path / "server.keys", www)
    capture = tmp_path / "c.pcapng"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture)).start()
    url = f"https://{lab.client_ip}:{PORT}/index.html"
    clients = []
    for tls in ("1.3", "1.2"):
        client = lab.spawn(lab.pod, SYSTEM_PYTHON, "-c", PYTHON_CLIENT, url, tls)
        assert client.wait(timeout=30) == 0, client.stderr.read()
        clients.append((client.pid, "python3 (/usr/bin/python3"))
    s_client = lab.spawn(lab.pod, "openssl", "s_client", "-connect",
                         f"{lab.client_ip}:{PORT}", "-quiet", "-tls1_3",
                         stdin=subprocess.PIPE)
    s_client.communicate(b"GET /index.html HTTP/1.0\r\n\r\n", timeout=30)
    clients.append((s_client.pid, "openssl ("))
    go = go_peer("system", "plain")
    go_client = lab.spawn(lab.pod, str(go.path), "-mode", "client", "-tls", "1.3", "-keylog",
                          str(tmp_path / "go.keys"), "-http1", url)
    assert go_client.wait(timeout=30) == 0, go_client.stderr.read()
    clients.append((go_client.pid, f"{go.path.name[:15]} ("))
    assert process.stop() == 0, process.stderr

    rows = tshark.fields(capture, "tcp.stream", "frame.comment",
                         display_filter="tls.handshake.type == 1")
    assert len(rows) == len(clients), rows  # one ClientHello per session, each commented
    for (pid, command), (_stream, comment) in zip(clients, rows, strict=True):
        assert comment.startswith(f"TLS keys: client pid {pid} {command}"), comment
    for _stream, comment in rows[:-1]:
        assert "OpenSSL 3." in comment and "libssl.so.3)" in comment, comment
    go_version = go.go_version.removeprefix("go")
    assert rows[-1][1].endswith(f", Go {go_version} ({go.path})"), rows[-1][1]
