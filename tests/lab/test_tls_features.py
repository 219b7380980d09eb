"""Issue 6: resumed sessions and HelloRetryRequest decrypt through the openssl CLI.

openssl s_server -www in the pod (its own -keylogfile is the reference), openssl s_client in
the client namespace: -sess_out / -sess_in resume, -groups forces a HelloRetryRequest. Its
BIO_f_ssl path has implicit handshakes; test_matrix.py runs the same features (and the 3.5+
hybrid group X25519MLKEM768) through the C API on every OpenSSL in its matrix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from tests.support import tls_lab, tshark
from tests.support.tls_lab import read_keylog

PORT = 4433
TSHARK_OPTIONS = ("-o", "tcp.reassemble_out_of_order:TRUE",
                    "-o", "http.desegment_body:FALSE")  # s_server -www: no Content-Length


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_lab.make_certificate(tmp_path_factory.mktemp("cert"))


def serve(lab: Lab, certificate: tuple[Path, Path], keylog: Path, *options: str) -> None:
    lab.spawn(lab.pod, "openssl", "s_server", "-accept", str(PORT), "-cert", str(certificate[0]),
              "-key", str(certificate[1]), "-keylogfile", str(keylog), "-www", "-quiet",
              *options)
    lab.wait_for_port(lab.pod, PORT)


def connect(lab: Lab, *options: str) -> str:
    result = lab.run(lab.client, "openssl", "s_client", "-connect", f"{lab.pod_ip}:{PORT}",
                     "-ign_eof", *options, input="GET / HTTP/1.0\r\n\r\n", check=False)
    return result.stdout


def decrypted_responses(capture: Path) -> int:
    return len(tshark.fields(capture, "frame.number", display_filter="http.response",
                             extra=TSHARK_OPTIONS))


@pytest.mark.parametrize(("name", "client_options"), [
    ("tls1.3-psk", ["-tls1_3"]),
    ("tls1.2-ticket", ["-tls1_2"]),
    ("tls1.2-session-id", ["-tls1_2", "-no_ticket"]),
])
def test_resumed_sessions(lab: Lab, keytap, tmp_path: Path, certificate, name: str,
                          client_options: list[str]) -> None:
    server_keys, output, keylog = tmp_path / "server.keys", tmp_path / "c.pcapng", tmp_path / "k"
    serve(lab, certificate, server_keys)
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(output), "--keylog-file",
                     str(keylog)).start()
    session = tmp_path / "session.pem"
    first = connect(lab, *client_options, "-sess_out", str(session))
    resumed = connect(lab, *client_options, "-sess_in", str(session))
    assert process.stop() == 0, process.stderr

    assert "New, " in first and "Reused, " in resumed, (first[-800:], resumed[-800:])
    assert read_keylog(keylog) == read_keylog(server_keys)
    assert len(read_keylog(keylog)) == (10 if name.startswith("tls1.3") else 2)
    assert decrypted_responses(output) == 2


def test_hello_retry_request(lab: Lab, keytap, tmp_path: Path, certificate) -> None:
    """The client's first key share is for a group the server refuses: HRR, same random."""
    server_keys, output, keylog = tmp_path / "server.keys", tmp_path / "c.pcapng", tmp_path / "k"
    serve(lab, certificate, server_keys, "-groups", "P-256")
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(output), "--keylog-file",
                     str(keylog)).start()
    connect(lab, "-tls1_3", "-groups", "X25519:P-256")
    assert process.stop() == 0, process.stderr

    client_hellos = tshark.fields(output, "frame.number", display_filter="tls.handshake.type == 1")
    assert len(client_hellos) == 2  # the second one answers the HelloRetryRequest
    assert read_keylog(keylog) == read_keylog(server_keys)
    assert len(read_keylog(keylog)) == 5
    assert decrypted_responses(output) == 1
