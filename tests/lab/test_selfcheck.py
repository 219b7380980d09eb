"""Issue 6: a struct-offsets table that does not fit its library is caught at run time.

Two negative controls, one per half of the self-check, each a wrong copy of the system
OpenSSL's layout. keytap must write no secrets from it, say so, and count it:
- memory: every offset moved by 8 bytes (what a distro build that inserted a pointer looks
  like): the protocol version read is implausible;
- wire: the client random read from the server random's place: every value is plausible, but
  no ClientHello on the wire carries the randoms read.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from keytap.tls.offsets import DEFAULT_PATH
from tests.support import tls_lab
from tests.support.matrix_env import SYSTEM_OPENSSL
from tests.support.tls_lab import SESSIONS, Session, read_keylog

PORT = 4433


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_lab.make_certificate(tmp_path_factory.mktemp("cert"))


def wrong_table(path: Path, change: Callable[[dict], None]) -> Path:
    """The committed table, with the system OpenSSL's layout changed by `change`."""
    table = json.loads(DEFAULT_PATH.read_text())
    layout = dict(table["layouts"][table["versions"][SYSTEM_OPENSSL]["layout"]])
    change(layout)
    table["layouts"]["wrong"] = layout
    table["versions"][SYSTEM_OPENSSL] = {"layout": "wrong", "tag": "test"}
    table["build_ids"] = {}
    path.write_text(json.dumps(table))
    return path


def shift_by_8(layout: dict) -> None:
    for name in ("ssl_version", "server", "s3", "session", "handshake_secret",
                 "handshake_traffic_hash", "client_app_traffic_secret",
                 "server_app_traffic_secret", "exporter_master_secret"):
        layout[name] += 8


def server_random_as_client_random(layout: dict) -> None:
    layout["s3_client_random"] = layout["s3_server_random"]


def assert_no_secrets_written(output: Path, keylog: Path) -> None:
    assert read_keylog(keylog) == set()
    secrets = subprocess.run(["capinfos", "-D", str(output)], capture_output=True, text=True,
                             check=True).stdout
    assert "decryption secrets" not in secrets  # capinfos names the count only when there are


def verdicts(stderr: str) -> list[str]:
    """keytap's warnings that a table does not fit (the summary repeats them, indented)."""
    return [line for line in stderr.splitlines() if line.startswith("keytap: TLS library ")
            and "struct offsets do not fit this build" in line]


def rejected(process, tmp_path: Path, server_lines: int) -> dict:
    """Stop keytap; the sessions happened, the table was rejected once, nothing was written.
    Returns the summary's TLS part."""
    assert process.stop() == 0, process.stderr
    assert len(read_keylog(tmp_path / "server.keys")) == server_lines
    assert_no_secrets_written(tmp_path / "c.pcapng", tmp_path / "keys")
    assert len(verdicts(process.stderr)) == 1, process.stderr
    report = json.loads((tmp_path / "summary.json").read_text())["tls"]
    assert report["tables_rejected"] == 1 and report["sessions_with_keys"] == 0
    return report


@pytest.fixture
def pod_server(lab: Lab, tmp_path: Path, certificate) -> None:
    """A Python HTTPS server in the pod (system libssl), logging its keys to server.keys."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello\n")
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT, certificate,
                                tmp_path / "server.keys", www)


def connect(lab: Lab, tmp_path: Path, sessions: tuple[Session, ...], name: str) -> None:
    """Clients in the client namespace fetch from the pod server, one session each."""
    for index, session in enumerate(sessions):
        tls_lab.python_ssl_client(lab, lab.client, lab.pod_ip, PORT, "/index.html", session,
                                  tmp_path / "client.keys", tmp_path / f"{name}-{index}")


def capture_with(keytap, lab: Lab, tmp_path: Path, change: Callable[[dict], None]):
    """keytap on the pod's veth with a wrong table, writing where `rejected` looks."""
    return keytap("capture", "-i", lab.pod_veth, "-o", str(tmp_path / "c.pcapng"),
                  "--keylog-file", str(tmp_path / "keys"), "--summary-json",
                  str(tmp_path / "summary.json"), "--offsets",
                  str(wrong_table(tmp_path / "wrong.json", change))).start()


@pytest.mark.usefixtures("pod_server")
def test_a_wrong_table_is_caught_and_writes_no_secrets(lab: Lab, keytap, tmp_path: Path) -> None:
    process = capture_with(keytap, lab, tmp_path, shift_by_8)
    connect(lab, tmp_path, SESSIONS, "out")
    report = rejected(process, tmp_path, server_lines=18)
    assert report["implausible_events"] >= 3


@pytest.mark.usefixtures("pod_server")
def test_randoms_that_no_client_hello_carries_are_caught_on_the_wire(lab: Lab, keytap,
                                                                     tmp_path: Path) -> None:
    process = capture_with(keytap, lab, tmp_path, server_random_as_client_random)
    connect(lab, tmp_path, SESSIONS, "out")
    process.wait_for("were in no ClientHello on the wire")
    connect(lab, tmp_path, SESSIONS[:1], "after")  # switched off: this one is not even read
    report = rejected(process, tmp_path, server_lines=18 + 5)
    assert report["implausible_events"] == 0  # every value read looked fine
    assert report["handshakes"] == report["keys_unconfirmed"] == len(SESSIONS)
    assert report["sessions_seen"] == len(SESSIONS) + 1


@pytest.mark.usefixtures("pod_server")
def test_a_fitting_table_passes_the_self_check(lab: Lab, keytap, tmp_path: Path) -> None:
    """The control for the control: the committed table, same traffic, nothing rejected."""
    summary, output = tmp_path / "summary.json", tmp_path / "c.pcapng"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(output),
                     "--summary-json", str(summary)).start()
    connect(lab, tmp_path, SESSIONS[:2], "out")
    assert process.stop() == 0, process.stderr
    secrets = subprocess.run(["capinfos", "-D", str(output)], capture_output=True, text=True,
                             check=True).stdout
    assert "Number of decryption secrets in file: 2" in secrets
    report = json.loads(summary.read_text())["tls"]
    assert report["tables_rejected"] == 0 and report["implausible_events"] == 0
    assert report["keys_unconfirmed"] == 0 and report["sessions_with_keys"] == 2
