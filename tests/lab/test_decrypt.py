"""Issue 4: Wireshark (tshark, one pass) decrypts keytap's file with nothing but the file.

The kernel itself reorders some segments on a multi-CPU veth (tcpdump records the same), so
tshark is told to reassemble out-of-order TCP segments: a TCP preference, not a key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keytap import READY_LINE
from keytap.demo.labnet import Lab
from tests.support import tls_lab, tshark
from tests.support.capi import sessions_to_json
from tests.support.runner import keytap_command
from tests.support.tls_lab import SESSIONS, Session

BODY_SIZE = 5 * 1024 * 1024
PORT = 4433
TCP_OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_lab.make_certificate(tmp_path_factory.mktemp("cert"))


@pytest.fixture
def body(tmp_path: Path) -> tuple[Path, bytes]:
    """A directory with one random 5 MiB file under a name per request."""
    www = tmp_path / "www"
    www.mkdir()
    content = os.urandom(BODY_SIZE)
    for index in range(len(SESSIONS)):
        for client in ("curl", "python"):
            (www / f"{client}-{index}.bin").write_bytes(content)
    return www, content


def fetch_all(lab: Lab, tmp_path: Path) -> None:
    for index, session in enumerate(SESSIONS):
        url = f"https://{lab.pod_ip}:{PORT}/curl-{index}.bin"
        tls_lab.curl(lab, lab.client, url, session, tmp_path / f"curl-{index}.out")
        tls_lab.python_ssl_client(lab, lab.client, lab.pod_ip, PORT, f"/python-{index}.bin",
                                  session, tmp_path / "client.keys",
                                  tmp_path / f"python-{index}.out")


def assert_all_bodies(exported: list[Path], content: bytes) -> None:
    names = sorted(p.name for p in exported)
    assert names == sorted(f"{c}-{i}.bin" for c in ("curl", "python")
                           for i in range(len(SESSIONS))), names
    assert all(p.read_bytes() == content for p in exported)


@pytest.mark.parametrize("server", ["python", "openssl"])
def test_every_body_decrypts_from_the_file_alone(lab: Lab, keytap, tmp_path: Path, certificate,
                                                 body, server: str) -> None:
    www, content = body
    if server == "python":
        tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT, certificate,
                                    tmp_path / "server.keys", www)
    else:
        tls_lab.start_openssl_www_server(lab, lab.pod, PORT, certificate, www)
    output = tmp_path / "capture.pcapng"
    summary = tmp_path / "summary.json"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(output),
                     "--summary-json", str(summary)).start()
    fetch_all(lab, tmp_path)
    assert process.stop() == 0, process.stderr

    if server == "python":
        exported = tshark.export_http_objects(output, tmp_path / "objects", TCP_OUT_OF_ORDER)
        assert_all_bodies(exported, content)
    else:  # s_server -WWW answers HTTP/1.0 without Content-Length: follow the streams instead
        streams = tshark.follow_tls(output, range(2 * len(SESSIONS)), TCP_OUT_OF_ORDER)
        responses = [side for sides in streams for side in sides if side.startswith(b"HTTP/")]
        assert len(responses) == 2 * len(SESSIONS)
        assert all(r.startswith(b"HTTP/1.0 200 ok") for r in responses)
        assert all(r.partition(b"\r\n\r\n")[2] == content for r in responses)
    report = json.loads(summary.read_text())["tls"]
    assert report["sessions_seen"] == report["sessions_with_keys"] == 2 * len(SESSIONS)
    assert report["sessions_without_keys"] == 0


def test_stdout_into_tshark_decrypts_live(lab: Lab, tmp_path: Path, certificate, body) -> None:
    www, content = body
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT, certificate,
                                tmp_path / "server.keys", www)
    objects = tmp_path / "objects"
    objects.mkdir()
    keytap = lab.spawn(lab.node, *keytap_command("capture", "-i", lab.pod_veth, "-o", "-"),
                       stdout=subprocess.PIPE, text=True)
    reader = subprocess.Popen(
        ["tshark", "-n", "-r", "-", "-q", *tshark.DECODE_AS, *TCP_OUT_OF_ORDER,
         "--export-objects", f"http,{objects}"], stdin=keytap.stdout, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    keytap.stdout.close()
    started = ""
    while READY_LINE not in started:
        line = keytap.stderr.readline()
        assert line, f"keytap did not start: {started}"
        started += line
    fetch_all(lab, tmp_path)
    keytap.send_signal(2)
    assert keytap.wait(timeout=60) == 0
    assert reader.wait(timeout=120) == 0, reader.stderr.read()
    assert_all_bodies(sorted(objects.iterdir()), content)


def test_plain_traffic_is_not_held_back_by_a_tls_flow_without_keys(
        lab: Lab, keytap, tmp_path: Path, certificate, body) -> None:
    """Keys never come (no offsets for the library): the TLS flow is held for --key-wait, and
    plain packets that arrived after its ClientHello are written before it."""
    www, _ = body
    no_offsets = tmp_path / "empty-offsets.json"
    no_offsets.write_text(json.dumps({"generator": "test", "layouts": {}, "versions": {},
                                      "build_ids": {}}))
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT, certificate,
                                tmp_path / "server.keys", www)
    output = tmp_path / "held.pcapng"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(output), "--offsets",
                     str(no_offsets), "--key-wait", "3").start()
    tls_session = lab.spawn(lab.client, sys.executable, str(tls_lab.HERE / "tls_client.py"),
                            "--openssl", "system", "--sessions",
                            sessions_to_json([Session("1.3")]), "--keylog", str(tmp_path / "k"),
                            "--out", str(tmp_path / "o"), lab.pod_ip, str(PORT), "/curl-0.bin")
    assert tls_session.wait(timeout=60) == 0
    lab.run(lab.client, "ping", "-c", "5", "-i", "0.1", lab.pod_ip)
    # the pings leave the reorder window while the TLS flow is still held: wait until they
    # are in the file (keytap flushes as it writes), then stop
    deadline = time.monotonic() + 10
    while len(tshark.fields(output, "icmp.type", display_filter="icmp")) < 10:
        assert time.monotonic() < deadline, "the pings never reached the file"
        time.sleep(0.05)
    assert process.stop() == 0, process.stderr

    rows = tshark.fields(output, "frame.number", "frame.time_epoch", "tls.handshake.type",
                         "icmp.type")
    hello = next(row for row in rows if row[2].split(",")[0] == "1")
    pings = [row for row in rows if row[3]]
    assert len(pings) == 10
    # every ping came after the ClientHello on the wire, and is written before it
    assert all(float(p[1]) > float(hello[1]) for p in pings)
    assert all(int(p[0]) < int(hello[0]) for p in pings)
    assert "with keys 0, without 1" in process.stderr
