"""Issue 3: keytap's key log equals, as a set, what the endpoints themselves logged."""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from tests.support import matrix_env, tls_lab
from tests.support.tls_lab import SESSIONS, Session, read_keylog

PORT = 4433


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_lab.make_certificate(tmp_path_factory.mktemp("cert"))


@pytest.fixture
def www(tmp_path: Path) -> Path:
    directory = tmp_path / "www"
    directory.mkdir()
    (directory / "index.html").write_bytes(b"keytap lab\n" * 100)
    return directory


def capture_keys(keytap, lab: Lab, tmp_path: Path, *extra: str):
    keylog = tmp_path / "keytap.keys"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(tmp_path / "c.pcapng"),
                     "--keylog-file", str(keylog), *extra).start()
    return process, keylog


def finish(process, keylog: Path) -> set[str]:
    assert process.stop() == 0, process.stderr
    assert stat.S_IMODE(keylog.stat().st_mode) == 0o600
    return read_keylog(keylog)


def started_after_keytap(lab: Lab, process) -> None:
    """A pod app with a static OpenSSL starts after keytap: keytap finds and probes it."""
    tls_lab.start_static_openssl_app(lab, lab.pod)
    process.wait_for("(static), probed")


def test_curl_to_openssl_s_server(lab: Lab, keytap, tmp_path: Path, certificate) -> None:
    process, keylog = capture_keys(keytap, lab, tmp_path)
    expected: set[str] = set()
    for index, session in enumerate(SESSIONS):
        server_keys = tmp_path / f"server-{index}.keys"
        tls_lab.start_openssl_server(lab, lab.pod, PORT + index, certificate, server_keys,
                                     session)
        tls_lab.curl(lab, lab.client, f"https://{lab.pod_ip}:{PORT + index}/", session,
                     tmp_path / f"out-{index}")
        expected |= read_keylog(server_keys)
    got = finish(process, keylog)
    assert len(expected) == 3 * 5 + 3 * 1  # five lines per TLS 1.3 session, one per 1.2
    assert got == expected, process.stderr


@pytest.mark.parametrize("suite", ["TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256"])
def test_ccm_suites(lab: Lab, keytap, tmp_path: Path, certificate, suite: str) -> None:
    """The two TLS 1.3 suites OpenSSL does not enable by default."""
    session = Session("1.3", suite)
    server_keys = tmp_path / "server.keys"
    tls_lab.start_openssl_server(lab, lab.pod, PORT, certificate, server_keys, session)
    process, keylog = capture_keys(keytap, lab, tmp_path)
    tls_lab.curl(lab, lab.client, f"https://{lab.pod_ip}:{PORT}/", session, tmp_path / "out")
    got = finish(process, keylog)
    assert len(got) == 5
    assert got == read_keylog(server_keys), process.stderr


def test_python_client_to_python_server(lab: Lab, keytap, tmp_path: Path, certificate,
                                        www: Path) -> None:
    server_keys = tmp_path / "server.keys"
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT, certificate, server_keys, www)
    process, keylog = capture_keys(keytap, lab, tmp_path)
    client_keys = tmp_path / "client.keys"
    for index, session in enumerate(SESSIONS):
        tls_lab.python_ssl_client(lab, lab.client, lab.pod_ip, PORT, "/index.html", session,
                                  client_keys, tmp_path / f"out-{index}")
    got = finish(process, keylog)
    assert read_keylog(server_keys) == read_keylog(client_keys)
    assert got == read_keylog(server_keys), process.stderr
    assert len(got) == 18


def test_openssl_s_client_to_python_server(lab: Lab, keytap, tmp_path: Path, certificate,
                                           www: Path) -> None:
    server_keys = tmp_path / "server.keys"
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT, certificate, server_keys, www)
    process, keylog = capture_keys(keytap, lab, tmp_path)
    for index, session in enumerate(SESSIONS):
        tls_lab.openssl_client(lab, lab.client, lab.pod_ip, PORT, session,
                               tmp_path / f"client-{index}.keys")
    got = finish(process, keylog)
    assert got == read_keylog(server_keys), process.stderr
    assert len(got) == 18


@pytest.mark.parametrize("openssl", ["system", "cryptography"])
def test_implicit_handshake_client_in_pod(lab: Lab, keytap, tmp_path: Path, certificate,
                                          www: Path, openssl: str) -> None:
    """The pod is the client; it never calls SSL_do_handshake. `cryptography` is static."""
    tls_lab.start_python_server(lab, lab.client, lab.client_ip, PORT, certificate,
                                tmp_path / "server.keys", www)
    process, keylog = capture_keys(keytap, lab, tmp_path)
    if openssl == "cryptography":
        started_after_keytap(lab, process)
    client_keys = tmp_path / "client.keys"
    tls_lab.capi_client(lab, lab.pod, lab.client_ip, PORT, "/index.html", SESSIONS,
                        client_keys, tmp_path / "out", openssl=openssl, implicit=True)
    got = finish(process, keylog)
    assert got == read_keylog(client_keys), process.stderr
    assert len(got) == 18


@pytest.mark.parametrize("tls", ["1.3", "1.2"])
def test_implicit_handshakes_on_one_ssl_object(lab: Lab, keytap, tmp_path: Path, certificate,
                                               www: Path, tls: str) -> None:
    """Three connections on one SSL object, SSL_clear between them, SSL_write first: each
    new handshake's secrets are read anew, though its SSL's earlier ones already left."""
    tls_lab.start_python_server(lab, lab.client, lab.client_ip, PORT, certificate,
                                tmp_path / "server.keys", www)
    process, keylog = capture_keys(keytap, lab, tmp_path)
    client_keys = tmp_path / "client.keys"
    tls_lab.capi_client(lab, lab.pod, lab.client_ip, PORT, "/index.html", (Session(tls),) * 3,
                        client_keys, tmp_path / "out", openssl="system", implicit=True,
                        one_ssl=True)
    got = finish(process, keylog)
    assert got == read_keylog(client_keys), process.stderr
    assert len(got) == 3 * (5 if tls == "1.3" else 1)


def test_implicit_handshakes_of_openssl_1_1_1(lab: Lab, keytap, tmp_path: Path, certificate,
                                              www: Path) -> None:
    """1.1.1 keeps its s3 state behind a pointer: connections in SSLs that take the freed
    memory of earlier ones, SSL_write first, each get their secrets read."""
    python = str(matrix_env.venv_python("3.4.8"))  # cryptography 3.4.8: OpenSSL 1.1.1l
    tls_lab.start_python_server(lab, lab.client, lab.client_ip, PORT, certificate,
                                tmp_path / "server.keys", www)
    process, keylog = capture_keys(keytap, lab, tmp_path)
    client_keys = tmp_path / "client.keys"
    tls_lab.capi_client(lab, lab.pod, lab.client_ip, PORT, "/index.html", SESSIONS,
                        client_keys, tmp_path / "out", openssl="cryptography", python=python,
                        implicit=True)
    got = finish(process, keylog)
    assert got == read_keylog(client_keys), process.stderr
    assert len(got) == 18


def test_static_openssl_explicit_handshake(lab: Lab, keytap, tmp_path: Path, certificate,
                                           www: Path) -> None:
    tls_lab.start_python_server(lab, lab.client, lab.client_ip, PORT, certificate,
                                tmp_path / "server.keys", www)
    process, keylog = capture_keys(keytap, lab, tmp_path)
    started_after_keytap(lab, process)
    client_keys = tmp_path / "client.keys"
    tls_lab.capi_client(lab, lab.pod, lab.client_ip, PORT, "/index.html", SESSIONS,
                        client_keys, tmp_path / "out", openssl="cryptography")
    got = finish(process, keylog)
    assert got == read_keylog(client_keys), process.stderr
    assert len(got) == 18


def test_processes_outside_the_pod_are_not_captured(lab: Lab, keytap, tmp_path: Path,
                                                    certificate, www: Path) -> None:
    """Server and client both in the client namespace: not behind the captured veth. The
    kernel reads nothing of them; with --all-processes it reads them, but their ClientHellos
    are on no captured interface, so nothing of them is written (see the wire check)."""
    server_keys = tmp_path / "server.keys"
    tls_lab.start_python_server(lab, lab.client, lab.client_ip, PORT, certificate, server_keys,
                                www)
    process, keylog = capture_keys(keytap, lab, tmp_path, "--summary-json",
                                   str(tmp_path / "scoped.json"))
    for index, session in enumerate(SESSIONS[:2]):
        tls_lab.python_ssl_client(lab, lab.client, lab.client_ip, PORT, "/index.html", session,
                                  tmp_path / "client.keys", tmp_path / f"out-{index}")
    got = finish(process, keylog)
    assert len(read_keylog(server_keys)) == 10
    assert got == set()
    assert json.loads((tmp_path / "scoped.json").read_text())["tls"]["handshakes"] == 0

    (tmp_path / "all").mkdir()
    process, keylog = capture_keys(keytap, lab, tmp_path / "all", "--all-processes",
                                   "--summary-json", str(tmp_path / "all.json"))
    tls_lab.python_ssl_client(lab, lab.client, lab.client_ip, PORT, "/index.html", SESSIONS[0],
                              tmp_path / "client2.keys", tmp_path / "out-all")
    assert finish(process, keylog).isdisjoint(read_keylog(tmp_path / "client2.keys"))
    # every process on the machine is in scope now, so other TLS traffic may add events
    report = json.loads((tmp_path / "all.json").read_text())["tls"]
    assert report["handshakes"] >= 2 and report["keys_unconfirmed"] >= 2, report


def test_a_libssl_deleted_under_a_running_server(lab: Lab, keytap, tmp_path: Path, certificate,
                                                 www: Path) -> None:
    """An upgrade replaced the libssl a running service has mapped: the file it uses is gone
    (its maps say "(deleted)"). keytap reads and probes it through /proc/PID/map_files."""
    system = next(Path(path) for path in sorted(glob.glob("/usr/lib/*/libssl.so.3")))
    old = tmp_path / "old-lib"
    old.mkdir()
    shutil.copy2(system, old / "libssl.so.3")
    server_keys = tmp_path / "server.keys"
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT, certificate, server_keys, www,
                                env={**os.environ, "LD_LIBRARY_PATH": str(old)})
    (old / "libssl.so.3").unlink()
    process, keylog = capture_keys(keytap, lab, tmp_path)
    for index, session in enumerate(SESSIONS):
        tls_lab.openssl_client(lab, lab.client, lab.pod_ip, PORT, session,
                               tmp_path / f"client-{index}.keys")
    got = finish(process, keylog)
    assert f"{old}/libssl.so.3 (deleted): OpenSSL" in process.stderr  # the premise, and named
    assert got == read_keylog(server_keys), process.stderr
    assert len(got) == 18
