"""Rotation (-C, -W) with files that stand on their own (issue 15).

A TLS download that spans three files decrypts from their merge (mergecap), and each of the
three carries the session's keys; short sessions after it decrypt from their own file alone;
-W keeps exactly that many files; the files' statistics blocks add up to the summary's counts.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

from keytap.demo.labnet import Lab
from tests.support import tls_lab, tshark
from tests.support.capi import Session
from tests.support.pcapng_blocks import BT_EPB, BT_ISB, dsb_lines, walk
from tests.support.tls_lab import read_keylog

PORT = 4433
BIG = 2_600_000  # bytes: with -C 1, three files
SMALL = "hello, rotated\n"
SESSION = Session("1.3", "TLS_AES_128_GCM_SHA256")
SHORT_SESSIONS = 3
OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")
ISB_IFRECV, ISB_USRDELIV = 4, 8


def serve(lab: Lab, tmp_path: Path) -> bytes:
    www = tmp_path / "www"
    www.mkdir()
    body = os.urandom(BIG)
    (www / "big.bin").write_bytes(body)
    (www / "small.html").write_text(SMALL)
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT,
                                tls_lab.make_certificate(tmp_path), tmp_path / "server.keys", www)
    return body


def fetch(lab: Lab, tmp_path: Path, path: str, out: str) -> bytes:
    tls_lab.python_ssl_client(lab, lab.client, lab.pod_ip, PORT, path, SESSION,
                              tmp_path / "client.keys", tmp_path / out)
    return (tmp_path / out).read_bytes()


def statistics(capture: Path) -> tuple[int, int, int]:
    """(EPBs, isb_ifrecv, isb_usrdeliv) of one file, summed over its interfaces."""
    packets = received = delivered = 0
    for block in walk(capture.read_bytes()):
        if block.type == BT_EPB:
            packets += 1
        if block.type != BT_ISB:
            continue
        offset, options = 12, {}
        while offset < len(block.body):
            code, length = struct.unpack_from("<HH", block.body, offset)
            if code == 0:
                break
            options[code] = block.body[offset + 4: offset + 4 + length]
            offset += 4 + length + (-length % 4)
        received += struct.unpack("<Q", options[ISB_IFRECV])[0]
        delivered += struct.unpack("<Q", options[ISB_USRDELIV])[0]
    return packets, received, delivered


def test_a_download_spanning_three_files_decrypts_from_their_merge(
        lab: Lab, keytap, tmp_path: Path) -> None:
    body = serve(lab, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    process = keytap("capture", "-i", lab.pod_veth, "-w", str(out / "c.pcapng"), "-C", "1",
                     "--summary-json", str(tmp_path / "summary.json")).start()
    assert fetch(lab, tmp_path, "/big.bin", "big") == body
    download_keys = read_keylog(tmp_path / "client.keys")
    for index in range(SHORT_SESSIONS):
        assert fetch(lab, tmp_path, "/small.html", f"small-{index}").decode() == SMALL
    assert process.stop() == 0, process.stderr
    files = [out / "c.pcapng", out / "c.pcapng1", out / "c.pcapng2"]
    assert sorted(out.iterdir()) == sorted(files), process.stderr  # whole, renamed into place
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["files"] == [str(f) for f in files]
    for capture in files:
        assert capture.stat().st_mode & 0o777 == 0o600
        assert download_keys <= dsb_lines(capture), capture  # every file: the download's keys

    merged = tmp_path / "merged.pcapng"
    subprocess.run(["mergecap", "-w", str(merged), *map(str, files)], check=True)
    bodies = tshark.export_http_objects(merged, tmp_path / "merged-objects", OUT_OF_ORDER)
    assert sorted(b.read_bytes() for b in bodies) == sorted(
        [body] + [SMALL.encode()] * SHORT_SESSIONS)

    last = tshark.export_http_objects(files[-1], tmp_path / "last-objects", OUT_OF_ORDER)
    assert [b.read_text() for b in last if b.name.startswith("small")] == \
        [SMALL] * SHORT_SESSIONS  # short sessions decrypt from their own file alone

    counts = [statistics(capture) for capture in files]
    assert all(packets == delivered for packets, _, delivered in counts)
    assert sum(delivered for *_, delivered in counts) == summary["packets"]["written"]
    assert sum(received for _, received, _ in counts) == summary["packets"]["seen"]
    assert summary["packets"]["dropped"] == 0


def test_w_keeps_exactly_that_many_files(lab: Lab, keytap, tmp_path: Path) -> None:
    body = serve(lab, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    process = keytap("capture", "-i", lab.pod_veth, "-w", str(out / "ring.pcapng"),
                     "-C", "0.4", "-W", "3").start()
    assert fetch(lab, tmp_path, "/big.bin", "big") == body  # about seven files' worth
    assert process.stop() == 0, process.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"ring.pcapng{n}" for n in range(3)]
