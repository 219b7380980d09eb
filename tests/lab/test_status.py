"""What keytap says while it captures (issue 15): on a tty the live status counts TLS sessions
seen and with keys; --quiet says nothing unless something is wrong; the summary names the file.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

from keytap.demo.labnet import Lab
from tests.support import tls_lab, tshark
from tests.support.runner import keytap_command

PORT = 4433
BODY = "status\n"


def serve(lab: Lab, tmp_path: Path) -> str:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text(BODY)
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT,
                                tls_lab.make_certificate(tmp_path), tmp_path / "server.keys", www)
    return f"https://{lab.pod_ip}:{PORT}/index.html"


def test_quiet_says_nothing_and_captures_all(lab: Lab, tmp_path: Path) -> None:
    url = serve(lab, tmp_path)
    capture, summary = tmp_path / "c.pcapng", tmp_path / "summary.json"
    result = subprocess.run(lab.command(lab.node, *keytap_command(
        "capture", "--quiet", "-i", lab.pod_veth, "-w", str(capture), "--summary-json",
        str(summary), "--", "curl", "-sfk", "-o", str(tmp_path / "got"), url)),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (tmp_path / "got").read_text() == BODY
    assert json.loads(summary.read_text())["files"] == [str(capture)]
    bodies = tshark.export_http_objects(capture, tmp_path / "objects")
    assert [b.read_text() for b in bodies] == [BODY]


def read_until(fd: int, text: str, timeout_s: float) -> str:
    seen = b""
    deadline = time.monotonic() + timeout_s
    while text.encode() not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the other side closed
                break
    return seen.decode(errors="replace")


def test_live_status_on_a_tty_counts_tls_sessions(lab: Lab, tmp_path: Path) -> None:
    url = serve(lab, tmp_path)
    capture = tmp_path / "c.pcapng"
    controller, terminal = pty.openpty()
    process = subprocess.Popen(lab.command(lab.node, *keytap_command(
        "capture", "-i", lab.pod_veth, "-o", str(capture))), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=terminal, start_new_session=True)
    os.close(terminal)
    try:
        assert "capturing on" in read_until(controller, "capturing on", 60)
        for _ in range(2):
            lab.run(lab.client, "curl", "-sfk", "-o", str(tmp_path / "got"), url)
        shown = read_until(controller, "TLS sessions 2, with keys 2", 10)
        assert "TLS sessions 2, with keys 2" in shown, shown
        process.send_signal(signal.SIGINT)
        assert f"written to {capture}" in read_until(controller, f"written to {capture}", 30)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
