"""Coverage for OpenSSL before 1.1.1: TLS 1.2 only, and no keylog callback.

1.1.0j as the cryptography 2.4.2 wheel links it statically, 1.0.2r as the shared libssl that
psycopg2-binary 2.8 bundles (matrix_env.LEGACY_WHEELS; tls_legacy.py drives either). The
peer is the system libssl in the client namespace. Per (release, role) one keytap capture on
the pod's veth holds one TLS 1.2 session per cipher suite. The pod's client never calls
SSL_do_handshake (SSL_write does the handshake), so its keys can only come from the probe on
SSL_in_init (a macro over SSL_state in 1.0.2); the pod's server calls it. And:

- keytap's --keylog-file equals, as a set, the peer's key log (its keylog callback: the pod's
  library has none); on 1.1.0 what the pod's own API reports (SSL_SESSION_get_master_key)
  equals it too;
- tshark decrypts every session's response from keytap's file alone, and every ClientHello on
  the wire is one of the sessions';
- keytap found the pod's library, with its exact version, and probed it.

A failure lists what differed per session, like test_matrix.py, whose helpers it uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab, sh
from tests import support
from tests.lab.test_matrix import (
    PORT,
    ROLES,
    connections_by_random,
    connections_of,
    keylog_problems,
    wire_problems,
)
from tests.support import matrix_env, tls_lab
from tests.support.capi import Session, response
from tests.support.matrix_env import LegacyOpenssl
from tests.support.runner import KeytapProcess
from tests.support.tls_lab import read_keylog

DRIVER = str(Path(support.__file__).with_name("tls_legacy.py"))
AUTHS = ("RSA", "ECDSA")  # the peer server's certificate for each, on PORT and PORT + 1
COMMON = (
    Session("1.2", "ECDHE-RSA-AES128-GCM-SHA256"),
    Session("1.2", "ECDHE-RSA-AES256-GCM-SHA384"),
    Session("1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    Session("1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
    Session("1.2", "ECDHE-RSA-AES128-SHA256"),  # CBC (encrypt-then-MAC where both have it)
    Session("1.2", "AES256-GCM-SHA384"),  # RSA key transport: no ephemeral key
)
SESSIONS_OF = {"1.1.0j": (*COMMON, Session("1.2", "ECDHE-ECDSA-CHACHA20-POLY1305")),
               "1.0.2r": COMMON}  # ChaCha20-Poly1305 came with 1.1.0
HAS_MASTER_KEY_API = {"1.1.0j": True, "1.0.2r": False}  # SSL_SESSION_get_master_key: 1.1.0

CASES = [pytest.param(release, role, id=f"openssl-{release}-{role}")
         for release in matrix_env.LEGACY_WHEELS for role in ROLES]


def auth_of(session: Session) -> str:
    """The certificate a suite needs (RSA key transport included)."""
    return "ECDSA" if "-ECDSA-" in session.cipher else "RSA"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("certs")
    (directory / "ecdsa").mkdir()
    cert, key = directory / "rsa-cert.pem", directory / "rsa-key.pem"
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
       "/CN=keytap-lab", "-keyout", str(key), "-out", str(cert))
    return {"RSA": (cert, key), "ECDSA": tls_lab.make_certificate(directory / "ecdsa")}


def legacy_openssl(release: str) -> LegacyOpenssl:
    """The release's venv or unpacked wheel; one that cannot be made fails the test with
    pip's message."""
    try:
        return matrix_env.legacy_openssl(release)
    except matrix_env.VenvError as exc:
        pytest.fail(f"no {matrix_env.LEGACY_WHEELS[release]} for OpenSSL {release}:\n{exc}",
                    pytrace=False)


def driver(legacy: LegacyOpenssl, release: str, tmp_path: Path, *args: str) -> list[str]:
    """tls_legacy.py's command line; it logs what the library's own API reports where it can."""
    own = (["--master-secrets", str(tmp_path / "own.keys")] if HAS_MASTER_KEY_API[release]
           else [])
    return [*legacy.command, DRIVER, "--openssl", legacy.openssl, *own, *args]


def wait_until_probed(process: KeytapProcess, legacy: LegacyOpenssl, release: str) -> None:
    """The pod's library was mapped after keytap started: its 1 s rescan must find and
    probe it, with the exact version."""
    process.wait_for(f"{legacy.library}: ")
    line = process.stderr.splitlines()[-1]
    assert line.endswith(f": OpenSSL {release} ({legacy.linkage}), probed"), process.stderr


def run_pod_clients(lab: Lab, process: KeytapProcess, legacy: LegacyOpenssl, release: str,
                    certificates: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """The pod's library as the client, with implicit handshakes, of system-libssl servers,
    one per certificate type."""
    sessions = SESSIONS_OF[release]
    servers = [tls_lab.start_capi_server(
        lab, lab.client, lab.client_ip, PORT + index, certificates[auth],
        tmp_path / "peer.keys", openssl="system",
        sessions=[s for s in sessions if auth_of(s) == auth]) for index, auth in enumerate(AUTHS)]
    lab.spawn(lab.pod, *driver(legacy, release, tmp_path, "hold"))
    wait_until_probed(process, legacy, release)
    for session in sessions:
        lab.run(lab.pod, *driver(legacy, release, tmp_path, "client", "--implicit", "--cipher",
                                 session.cipher, "--out", str(tmp_path / "out"), lab.client_ip,
                                 str(PORT + AUTHS.index(auth_of(session))), "/"))
    for server in servers:
        _, errors = server.communicate(timeout=60)
        assert server.returncode == 0, errors


def run_pod_server(lab: Lab, process: KeytapProcess, legacy: LegacyOpenssl, release: str,
                   certificates: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """The pod's library as the server (both certificates) of system-libssl clients."""
    sessions = SESSIONS_OF[release]
    files = [arg for auth in AUTHS
             for arg in ("--cert", str(certificates[auth][0]), "--key", str(certificates[auth][1]))]
    server = lab.spawn(lab.pod, *driver(legacy, release, tmp_path, "server", *files, "--bind",
                                        lab.pod_ip, "--port", str(PORT), "--count",
                                        str(len(sessions))))
    lab.wait_for_port(lab.pod, PORT, lab.pod_ip)
    wait_until_probed(process, legacy, release)
    tls_lab.capi_client(lab, lab.client, lab.pod_ip, PORT, "/", sessions,
                        tmp_path / "peer.keys", tmp_path / "out", openssl="system")
    _, errors = server.communicate(timeout=60)
    assert server.returncode == 0, errors


@pytest.mark.parametrize(("release", "role"), CASES)
def test_tls12_keys_and_decryption(lab: Lab, keytap, tmp_path: Path, certificates,
                                   release: str, role: str) -> None:
    legacy = legacy_openssl(release)
    sessions = SESSIONS_OF[release]
    capture, keys, summary = (tmp_path / "capture.pcapng", tmp_path / "keytap.keys",
                              tmp_path / "summary.json")
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--keylog-file",
                     str(keys), "--summary-json", str(summary)).start()
    run = run_pod_clients if role == "client" else run_pod_server
    run(lab, process, legacy, release, certificates, tmp_path)
    assert (tmp_path / "out").read_bytes() == response() * len(sessions)
    assert process.stop() == 0, process.stderr

    # A 3.x client also logs an RSA key transport's premaster ("RSA <encrypted premaster
    # prefix> <premaster>"); the session's CLIENT_RANDOM line already has its master secret.
    reference = [line.strip() for line in (tmp_path / "peer.keys").read_text().splitlines()
                 if line.strip() and not line.startswith("RSA ")]
    assert len(reference) == len(sessions), reference  # the test's own
    by_random = connections_by_random(reference, connections_of(sessions))
    problems = keylog_problems(reference, read_keylog(keys), by_random)
    problems += wire_problems(capture, by_random)
    if HAS_MASTER_KEY_API[release]:
        own = read_keylog(tmp_path / "own.keys")
        problems += [f"the pod's own API disagrees with the peer: {line}"
                     for line in own ^ set(reference)]
    report = json.loads(summary.read_text())["tls"]
    if not report["sessions_seen"] == report["sessions_with_keys"] == len(sessions):
        problems.append(f"keytap's summary: {report}")
    status = report["libraries"].get(str(legacy.library))
    if status != f"OpenSSL {release} ({legacy.linkage}), probed":
        problems.append(f"keytap's summary says of {legacy.library}: {status}")
    assert not problems, "\n".join(problems) + "\n\nkeytap said:\n" + process.stderr
