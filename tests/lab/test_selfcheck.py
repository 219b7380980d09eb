"""Issue 6: a struct-offsets table that does not fit its library is caught at run time.

The negative control: the system OpenSSL's layout with every offset moved by 8 bytes (what a
distro build that inserted a pointer looks like). keytap must write no secrets from it, say so,
and count it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from keytap.labnet import Lab
from keytap.tls.offsets import DEFAULT_PATH
from tests.lab import tls_lab
from tests.lab.tls_lab import SESSIONS, read_keylog

PORT = 4433
SYSTEM_OPENSSL = "3.0.19"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_lab.make_certificate(tmp_path_factory.mktemp("cert"))


def shifted_table(path: Path) -> Path:
    """The committed table, with the system OpenSSL's layout moved by 8 bytes."""
    table = json.loads(DEFAULT_PATH.read_text())
    layout = dict(table["layouts"][table["versions"][SYSTEM_OPENSSL]["layout"]])
    for name in ("ssl_version", "server", "s3", "session", "handshake_secret",
                 "handshake_traffic_hash", "client_app_traffic_secret",
                 "server_app_traffic_secret", "exporter_master_secret"):
        layout[name] += 8
    table["layouts"]["shifted"] = layout
    table["versions"][SYSTEM_OPENSSL] = {"layout": "shifted", "tag": "test"}
    table["build_ids"] = {}
    path.write_text(json.dumps(table))
    return path


@pytest.fixture
def pod_server(lab: Lab, tmp_path: Path, certificate) -> None:
    """A Python HTTPS server in the pod (system libssl), logging its keys to server.keys."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello\n")
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT, certificate,
                                tmp_path / "server.keys", www)


@pytest.mark.usefixtures("pod_server")
def test_a_wrong_table_is_caught_and_writes_no_secrets(lab: Lab, keytap, tmp_path: Path) -> None:
    output, keylog, summary = (tmp_path / "c.pcapng", tmp_path / "keys",
                               tmp_path / "summary.json")
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(output), "--keylog-file",
                     str(keylog), "--summary-json", str(summary), "--offsets",
                     str(shifted_table(tmp_path / "wrong.json"))).start()
    for index, session in enumerate(SESSIONS):
        tls_lab.python_ssl_client(lab, lab.client, lab.pod_ip, PORT, "/index.html", session,
                                  tmp_path / "client.keys", tmp_path / f"out-{index}")
    assert process.stop() == 0, process.stderr

    assert len(read_keylog(tmp_path / "server.keys")) == 18  # the sessions did happen
    assert read_keylog(keylog) == set()
    secrets = subprocess.run(["capinfos", "-D", str(output)], capture_output=True, text=True,
                             check=True).stdout
    assert "decryption secrets" not in secrets  # capinfos names the count only when there are
    assert process.stderr.count("struct offsets do not fit this build") >= 1, process.stderr
    report = json.loads(summary.read_text())["tls"]
    assert report["tables_rejected"] == 1
    assert report["implausible_events"] >= 3
    assert report["sessions_with_keys"] == 0


@pytest.mark.usefixtures("pod_server")
def test_a_fitting_table_passes_the_self_check(lab: Lab, keytap, tmp_path: Path) -> None:
    """The control for the control: the committed table, same traffic, nothing rejected."""
    summary, output = tmp_path / "summary.json", tmp_path / "c.pcapng"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(output),
                     "--summary-json", str(summary)).start()
    for index, session in enumerate(SESSIONS[:2]):
        tls_lab.python_ssl_client(lab, lab.client, lab.pod_ip, PORT, "/index.html", session,
                                  tmp_path / "client.keys", tmp_path / f"out-{index}")
    assert process.stop() == 0, process.stderr
    secrets = subprocess.run(["capinfos", "-D", str(output)], capture_output=True, text=True,
                             check=True).stdout
    assert "Number of decryption secrets in file: 2" in secrets
    report = json.loads(summary.read_text())["tls"]
    assert report["tables_rejected"] == 0 and report["implausible_events"] == 0
    assert report["sessions_with_keys"] == 2
