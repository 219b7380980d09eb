"""Late keys are never wasted: keys that come after their session's packets were written.

A relay in the client namespace holds the server's first flight back for DELAY_S, longer than
--key-wait: every TLS flow is let go without keys, and its keys arrive later. With a regular
output file keytap puts them ahead of the packets at the end (tshark decrypts every session
from the rewritten file alone); on standard output they are written as they come, and
counted. And a long-lived client whose libssl keytap finds only at its next rescan (on a file
system mounted after keytap started, which the launch gate does not watch): its keys come
when it next calls into libssl, long after its handshakes were written.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from tests import support
from tests.support import debian_suites, tls_lab, tshark
from tests.support.pcapng_blocks import BT_DSB, BT_EPB, walk
from tests.support.tls_lab import SESSIONS, read_keylog

PORT, RELAY_PORT = 4433, 4434
DELAY_S, KEY_WAIT_S = 0.6, 0.2
RELAY = str(Path(support.__file__).with_name("delay_relay.py"))
LATE_CLIENT = str(Path(support.__file__).with_name("late_client.py"))
PAUSE_S = 2.5  # > keytap's rescan interval (1 s) + --key-wait
OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")


@pytest.fixture
def delayed_pod_server(lab: Lab, tmp_path: Path) -> None:
    """The pod's HTTPS server (system libssl, key log server.keys), reached through the relay."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello, late\n")
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT, tls_lab.make_certificate(
        tmp_path), tmp_path / "server.keys", www)
    lab.spawn(lab.client, sys.executable, RELAY, lab.client_ip, str(RELAY_PORT), lab.pod_ip,
              str(PORT), str(DELAY_S))
    lab.wait_for_port(lab.client, RELAY_PORT, lab.client_ip)


def connect_all(lab: Lab, tmp_path: Path) -> None:
    for index, session in enumerate(SESSIONS):
        tls_lab.python_ssl_client(lab, lab.client, lab.client_ip, RELAY_PORT, "/index.html",
                                  session, tmp_path / "client.keys", tmp_path / f"out-{index}")
        assert (tmp_path / f"out-{index}").read_text() == "hello, late\n"


def summary_of(path: Path) -> dict:
    return json.loads(path.read_text())["tls"]


@pytest.mark.usefixtures("delayed_pod_server")
def test_late_keys_are_put_ahead_of_their_packets(lab: Lab, keytap, tmp_path: Path) -> None:
    capture, keys = tmp_path / "c.pcapng", tmp_path / "keys"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--keylog-file",
                     str(keys), "--key-wait", str(KEY_WAIT_S), "--summary-json",
                     str(tmp_path / "summary.json")).start()
    connect_all(lab, tmp_path)
    assert process.stop() == 0, process.stderr
    report = summary_of(tmp_path / "summary.json")
    assert report["sessions_without_keys"] == len(SESSIONS)  # every hold ran out first
    assert report["sessions_rescued"] == len(SESSIONS), process.stderr
    assert read_keylog(keys) == read_keylog(tmp_path / "server.keys")
    assert capture.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".c.pcapng")] == []
    blocks = [block.type for block in walk(capture.read_bytes())]
    first_packet = blocks.index(BT_EPB)
    assert blocks[:first_packet].count(BT_DSB) >= len(SESSIONS)  # the keys come first now
    bodies = tshark.export_http_objects(capture, tmp_path / "objects", OUT_OF_ORDER)
    assert len(bodies) == len(SESSIONS)
    assert all(body.read_text() == "hello, late\n" for body in bodies)


@pytest.mark.usefixtures("delayed_pod_server")
def test_on_standard_output_late_keys_are_written_as_they_come(lab: Lab, keytap,
                                                               tmp_path: Path) -> None:
    capture = tmp_path / "c.pcapng"
    with capture.open("wb") as stream:
        process = keytap("capture", "-i", lab.pod_veth, "-o", "-", "--key-wait",
                         str(KEY_WAIT_S), "--summary-json",
                         str(tmp_path / "summary.json")).start(stdout=stream)
        connect_all(lab, tmp_path)
        assert process.stop() == 0, process.stderr
    report = summary_of(tmp_path / "summary.json")
    assert report["sessions_rescued"] == 0
    assert report["keys_after_release"] == len(SESSIONS)
    secrets = subprocess.run(["capinfos", "-D", str(capture)], capture_output=True, text=True,
                             check=True).stdout
    assert f"Number of decryption secrets in file: {len(SESSIONS)}" in secrets


@contextlib.contextmanager
def libssl_on_a_new_mount(tmp_path: Path) -> Iterator[Path]:
    """A copy of the system libssl on a tmpfs mounted now, after keytap started."""
    directory = tmp_path / "mounted"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "keytap-late", directory],
                   check=True)
    try:
        for name in ("libssl.so.3", "libcrypto.so.3"):
            shutil.copy2(Path("/usr/lib") / debian_suites.MULTIARCH / name, directory / name)
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", directory], check=True)


def test_long_lived_client_probed_late_decrypts_from_the_rewritten_file(
        lab: Lab, keytap, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello, late\n")
    tls_lab.start_python_server(lab, lab.client, lab.client_ip, PORT, tls_lab.make_certificate(
        tmp_path), tmp_path / "server.keys", www)
    capture, keys = tmp_path / "c.pcapng", tmp_path / "keys"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--keylog-file",
                     str(keys), "--key-wait", str(KEY_WAIT_S), "--summary-json",
                     str(tmp_path / "summary.json")).start()
    with libssl_on_a_new_mount(tmp_path) as libs:
        lab.run(lab.pod, "env", f"LD_LIBRARY_PATH={libs}", sys.executable, LATE_CLIENT,
                lab.client_ip, str(PORT), str(tmp_path / "client.keys"), str(PAUSE_S),
                str(tmp_path / "out"), "1.3", "1.2")
    assert process.stop() == 0, process.stderr
    assert f"TLS library {libs}/libssl.so.3" in process.stderr  # found by the rescan
    report = summary_of(tmp_path / "summary.json")
    assert report["sessions_rescued"] == 2, process.stderr
    assert read_keylog(keys) == read_keylog(tmp_path / "client.keys")
    bodies = tshark.export_http_objects(capture, tmp_path / "objects", OUT_OF_ORDER)
    assert [body.read_text() for body in bodies] == ["hello, late\n"] * 2
