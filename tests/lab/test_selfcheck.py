"""A struct-offsets table that does not fit its library is caught at run time.

Negative controls, each a table whose only layout is a wrong copy of the system OpenSSL's
(so no other candidate can step in). keytap must write no secrets from it, say so, and count
it:
- memory: every offset moved by 8 bytes (what a distro build that inserted a pointer looks
  like): the protocol version read is implausible;
- wire: the client random read from the server random's place: every value is plausible, but
  no ClientHello on the wire carries the randoms read;
- proof: the client random is right, only the secrets are shifted: every value is plausible
  and the random is on the wire, but the session's records do not decrypt.
And with the right layouts in the table beside the wrong entry, keytap moves on to one that
proves itself, and writes only its keys.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from keytap.tls.candidates import TLS13_ARRAYS
from keytap.tls.offsets import DEFAULT_PATH
from keytap.tls.selfcheck import SELF_CHECK_FAILURES
from tests.support import tls_lab
from tests.support.matrix_env import SYSTEM_OPENSSL
from tests.support.pcapng_blocks import dsb_lines
from tests.support.tls_lab import SESSIONS, Session, read_keylog

PORT = 4433


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_lab.make_certificate(tmp_path_factory.mktemp("cert"))


def wrong_table(path: Path, change: Callable[[dict], None], others: bool = False) -> Path:
    """A table whose entry for the system OpenSSL is its layout changed by `change`: the
    only entry, or (`others`) beside every other entry of the committed table."""
    table = json.loads(DEFAULT_PATH.read_text())
    layout = dict(table["layouts"][table["versions"][SYSTEM_OPENSSL]["layout"]])
    change(layout)
    if not others:
        table["layouts"], table["versions"] = {}, {}
    table["layouts"]["wrong"] = layout
    table["versions"][SYSTEM_OPENSSL] = {"layout": "wrong", "tag": "test"}
    table["build_ids"] = {}
    path.write_text(json.dumps(table))
    return path


def shift_by_8(layout: dict) -> None:
    """What a build with one more pointer near the top of the struct looks like."""
    for name in ("ssl_version", "server", "s3", "session", *TLS13_ARRAYS):
        layout[name] += 8


def server_random_as_client_random(layout: dict) -> None:
    layout["s3_client_random"] = layout["s3_server_random"]


def app_secrets_moved(layout: dict) -> None:
    """Both application traffic secrets read from the next array along."""
    layout["client_app_traffic_secret"] += 64
    layout["server_app_traffic_secret"] += 64


def secrets_shifted(layout: dict) -> None:
    """Each secret read from its neighbour's place; the client random stays right."""
    for name in TLS13_ARRAYS:
        layout[name] += 64
    layout["session_master_key"] += 8


def assert_no_secrets_written(output: Path, keylog: Path) -> None:
    assert read_keylog(keylog) == set()
    secrets = subprocess.run(["capinfos", "-D", str(output)], capture_output=True, text=True,
                             check=True).stdout
    assert "decryption secrets" not in secrets  # capinfos names the count only when there are


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


def capture_with(keytap, lab: Lab, tmp_path: Path, change: Callable[[dict], None],
                 others: bool = False):
    """keytap on the pod's veth with a wrong table, writing where `rejected` looks."""
    return keytap("capture", "-i", lab.pod_veth, "-o", str(tmp_path / "c.pcapng"),
                  "--keylog-file", str(tmp_path / "keys"), "--summary-json",
                  str(tmp_path / "summary.json"), "--offsets",
                  str(wrong_table(tmp_path / "wrong.json", change, others))).start()


def corrected(process, tmp_path: Path, verdict: str, sessions: int) -> dict:
    """Stop keytap, which rejected the table's entry (`verdict`) and then proved the entry
    adjusted to the library's machine code: every key written is one the server logged, and
    the sessions after the verdict have keys. Returns the summary's TLS part."""
    assert process.stop() == 0, process.stderr
    assert verdict in process.stderr and "does not fit" in process.stderr
    assert any("adjusted to the build's machine code" in line and "proven on the wire" in line
               for line in process.stderr.splitlines()), process.stderr
    written = read_keylog(tmp_path / "keys")
    assert written and written <= read_keylog(tmp_path / "server.keys")
    assert dsb_lines(tmp_path / "c.pcapng") == written
    report = json.loads((tmp_path / "summary.json").read_text())["tls"]
    assert report["sessions_with_keys"] >= sessions and report["tables_rejected"] == 0
    return report


@pytest.mark.usefixtures("pod_server")
def test_a_wrong_table_is_caught_and_the_machine_code_corrects_it(lab: Lab, keytap,
                                                                   tmp_path: Path) -> None:
    process = capture_with(keytap, lab, tmp_path, shift_by_8)
    connect(lab, tmp_path, SESSIONS, "out")
    process.wait_for("does not fit")
    connect(lab, tmp_path, SESSIONS, "after")
    report = corrected(process, tmp_path, "implausible reads", len(SESSIONS))
    assert report["implausible_events"] >= 3


@pytest.mark.usefixtures("pod_server")
def test_randoms_that_no_client_hello_carries_are_caught_on_the_wire(lab: Lab, keytap,
                                                                     tmp_path: Path) -> None:
    process = capture_with(keytap, lab, tmp_path, server_random_as_client_random)
    connect(lab, tmp_path, SESSIONS, "out")
    process.wait_for("were in no ClientHello on the wire")
    connect(lab, tmp_path, SESSIONS, "after")
    report = corrected(process, tmp_path, "were in no ClientHello on the wire", len(SESSIONS))
    assert report["implausible_events"] == 0  # every value read looked fine
    assert report["keys_unconfirmed"] + report["keys_rejected"] >= SELF_CHECK_FAILURES


@pytest.mark.usefixtures("pod_server")
def test_shifted_secrets_with_the_right_random_are_refuted_by_the_records(
        lab: Lab, keytap, tmp_path: Path) -> None:
    """What the checks before the proof let through: plausible values, a random the wire
    carried. The session's own records refute the secrets; the layout adjusted to the
    library's machine code (which shows where the master key and the exporter secret are)
    is proven instead."""
    process = capture_with(keytap, lab, tmp_path, secrets_shifted)
    connect(lab, tmp_path, SESSIONS, "out")
    process.wait_for("does not fit")
    connect(lab, tmp_path, SESSIONS, "after")
    report = corrected(process, tmp_path, "did not decrypt under the secrets it read",
                       len(SESSIONS))
    assert report["implausible_events"] == 0 and report["keys_failed"] >= 1


@pytest.mark.usefixtures("pod_server")
def test_when_nothing_fits_nothing_is_written(lab: Lab, keytap, tmp_path: Path) -> None:
    """The application secrets read from the neighbouring arrays: a change no exported
    function shows, so no candidate can correct it. Plausible values, the right random, the
    right handshake secrets: the records refute the rest, and no line of it is written."""
    process = capture_with(keytap, lab, tmp_path, app_secrets_moved)
    tls13 = tuple(session for session in SESSIONS if session.tls == "1.3")
    connect(lab, tmp_path, tls13, "out")
    assert process.stop() == 0, process.stderr
    assert len(read_keylog(tmp_path / "server.keys")) == 5 * len(tls13)
    assert_no_secrets_written(tmp_path / "c.pcapng", tmp_path / "keys")
    report = json.loads((tmp_path / "summary.json").read_text())["tls"]
    assert report["keys_failed"] >= 1 and report["sessions_with_keys"] == 0
    assert "TLS 1.3 session's records did not decrypt" in process.stderr


@pytest.mark.usefixtures("pod_server")
def test_beside_the_right_layouts_a_wrong_entry_gives_way(lab: Lab, keytap,
                                                          tmp_path: Path) -> None:
    """The wrong entry is rejected after the first sessions (their records refute or fail to
    prove its keys); the next candidates are read, one is proven, and every key written is one
    the server logged itself."""
    process = capture_with(keytap, lab, tmp_path, secrets_shifted, others=True)
    connect(lab, tmp_path, SESSIONS[:SELF_CHECK_FAILURES], "first")
    process.wait_for("does not fit")
    connect(lab, tmp_path, SESSIONS, "out")
    assert process.stop() == 0, process.stderr
    written = read_keylog(tmp_path / "keys")
    assert written and written <= read_keylog(tmp_path / "server.keys")
    report = json.loads((tmp_path / "summary.json").read_text())["tls"]
    assert report["sessions_with_keys"] >= len(SESSIONS)  # all but the first ones
    assert report["tables_rejected"] == 0 and "proven on the wire" in process.stderr
    assert dsb_lines(tmp_path / "c.pcapng") == written


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
