"""Issue 6: QUIC connections of OpenSSL 3.2+ are skipped cleanly.

From 3.2 an `SSL *` can be a QUIC object (connection, stream, listener: `type != 0`) whose
fields are not a TLS connection's; quic_peer.py hands each of them to SSL_in_init, as
applications do. A QUIC connection also does its handshake in an inner TLS 1.3 object
(`type == 0`, TLS1_FLAGS_QUIC in s3.flags) that libssl drives through the probed
SSL_do_handshake / SSL_in_init. Its secrets are QUIC's, but their ClientHello is inside QUIC
Initial packets, where keytap cannot see it: such keys can be neither confirmed on the wire nor
written ahead of their packets, and beside keyless ClientHellos they made the wire self-check
switch the library off (the second test). bpf/tls.c skips both kinds, so "skipped cleanly"
means: nothing of a QUIC connection leaves the kernel (no key-log line, no DSB, nothing
implausible, no self-check failure), and TLS over TCP by the same library still decrypts.

The pod's TLS library is psycopg-binary's shared libssl (OpenSSL 3.5.4, quic_env.py), driven
by quic_peer.py, with the same library at the other end in the client namespace.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from keytap.tls.selfcheck import SELF_CHECK_FAILURES
from tests import support
from tests.support import quic_env, tls_lab, tshark
from tests.support.capi import response
from tests.support.matrix_env import VenvError
from tests.support.pcapng_blocks import dsb_lines
from tests.support.tls_lab import read_keylog

PORT = 4433
PEER = str(Path(support.__file__).with_name("quic_peer.py"))
TCP_OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")
# Keys wait this long for their ClientHello, a ClientHello this long for its keys: on a loaded
# machine too, the second test's keyless ClientHellos fall in the same moments as its QUIC
# handshakes, the coincidence that would make a table look wrong. Holds end at keytap's stop.
KEY_WAIT = "60"
# TLS ClientHellos that no probed library completes (nobody answers): the wire's view of a
# Go, Java or rustls client in the pod, whose keys keytap cannot have.
KEYLESS_HELLOS = """import socket, ssl, sys
for _ in range(int(sys.argv[3])):
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="lab")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:  # the ClientHello is out; no answer will come
        pass
    socket.create_connection((sys.argv[1], int(sys.argv[2]))).sendall(outgoing.read())
"""


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_lab.make_certificate(tmp_path_factory.mktemp("cert"))


@pytest.fixture(scope="module")
def libssl() -> Path:
    try:
        return quic_env.libssl()
    except VenvError as exc:
        pytest.fail(f"no OpenSSL with QUIC:\n{exc}", pytrace=False)


def start_keytap(lab: Lab, keytap, tmp_path: Path, libssl: Path):
    """keytap on the pod's veth, the QUIC library probed up front (its users are short-lived)."""
    return keytap("capture", "-i", lab.pod_veth, "-o", str(tmp_path / "c.pcapng"),
                  "--keylog-file", str(tmp_path / "keys"), "--summary-json",
                  str(tmp_path / "summary.json"), "--ssl-lib", str(libssl),
                  "--key-wait", KEY_WAIT).start()


def peer(libssl: Path, directory: Path, counts: tuple[str, ...], *args: str) -> list[str]:
    """quic_peer.py with its key logs in `directory`: what the library itself says."""
    directory.mkdir()
    return [sys.executable, PEER, "--libssl", str(libssl), "--quic-keylog",
            str(directory / "quic.keys"), "--tls-keylog", str(directory / "tls.keys"), *counts,
            *args]


def start_server(lab: Lab, libssl: Path, certificate: tuple[Path, Path], tmp_path: Path,
                 ns: str, ip: str, *counts: str):
    """quic_peer.py serve in `ns`; its key logs go to tmp_path/server/."""
    server = lab.spawn(ns, *peer(libssl, tmp_path / "server", counts, "serve", "--cert",
                                 str(certificate[0]), "--key", str(certificate[1]), "--bind",
                                 ip, "--port", str(PORT)))
    lab.wait_for_port(ns, PORT, ip)
    return server


def fetch(lab: Lab, libssl: Path, tmp_path: Path, ns: str, ip: str, *counts: str) -> None:
    """quic_peer.py fetch in `ns`; it fails unless each answer came; key logs: tmp_path/client/."""
    lab.run(ns, *peer(libssl, tmp_path / "client", counts, "fetch", ip, str(PORT)))


def finish(server) -> None:
    """The server exits 0 once it has served every connection it was told to."""
    _, errors = server.communicate()
    assert server.returncode == 0, errors.decode()


@pytest.mark.parametrize("pod_role", ["server", "client"])
def test_quic_then_tls_over_tcp_with_the_same_openssl(lab: Lab, keytap, tmp_path: Path,
                                                      certificate, libssl: Path,
                                                      pod_role: str) -> None:
    """One QUIC exchange, then one TLS-over-TCP exchange, in one pod process."""
    process = start_keytap(lab, keytap, tmp_path, libssl)
    server_ns, server_ip, client_ns = ((lab.pod, lab.pod_ip, lab.client) if pod_role == "server"
                                       else (lab.client, lab.client_ip, lab.pod))
    server = start_server(lab, libssl, certificate, tmp_path, server_ns, server_ip)
    fetch(lab, libssl, tmp_path, client_ns, server_ip)
    finish(server)
    assert process.stop() == 0, process.stderr

    quic = read_keylog(tmp_path / pod_role / "quic.keys")
    tls = read_keylog(tmp_path / pod_role / "tls.keys")
    assert len(quic) == len(tls) == 5 and not quic & tls
    report = json.loads((tmp_path / "summary.json").read_text())["tls"]
    assert report["libraries"][str(libssl)] == f"OpenSSL {quic_env.OPENSSL} (dynamic), probed"
    assert report["tables_rejected"] == 0 and report["implausible_events"] == 0
    assert report["handshakes"] == 1  # the TCP connection's; nothing of QUIC left the kernel
    assert report["quic_reads_skipped"] > 0  # the probes did see the QUIC objects
    assert read_keylog(tmp_path / "keys") == tls
    assert dsb_lines(tmp_path / "c.pcapng") == tls
    (sides,) = tshark.follow_tls(tmp_path / "c.pcapng", range(1), TCP_OUT_OF_ORDER)
    assert response() in sides  # the one TCP stream decrypts


def test_quic_beside_keyless_tls_does_not_switch_the_library_off(
        lab: Lab, keytap, tmp_path: Path, certificate, libssl: Path) -> None:
    """QUIC-only use of the library while TLS clients keytap has no keys for run beside it:
    had QUIC's secrets left the kernel, they would match no ClientHello on the wire while
    keyless ClientHellos of the same moments did, which is how a table that reads the wrong
    memory looks."""
    process = start_keytap(lab, keytap, tmp_path, libssl)
    rounds = str(SELF_CHECK_FAILURES)
    # the server's TCP port listens but answers nobody: --tls 0
    server = start_server(lab, libssl, certificate, tmp_path, lab.client, lab.client_ip,
                          "--quic", rounds, "--tls", "0")
    lab.run(lab.pod, sys.executable, "-c", KEYLESS_HELLOS, lab.client_ip, str(PORT), rounds)
    fetch(lab, libssl, tmp_path, lab.pod, lab.client_ip, "--quic", rounds, "--tls", "0")
    finish(server)
    assert process.stop() == 0, process.stderr

    quic = read_keylog(tmp_path / "client" / "quic.keys")
    assert len(quic) == 5 * SELF_CHECK_FAILURES
    report = json.loads((tmp_path / "summary.json").read_text())["tls"]
    assert report["sessions_without_keys"] == SELF_CHECK_FAILURES  # the keyless ClientHellos
    assert report["tables_rejected"] == 0, process.stderr
    assert report["libraries"][str(libssl)] == f"OpenSSL {quic_env.OPENSSL} (dynamic), probed"
    assert report["handshakes"] == 0 and read_keylog(tmp_path / "keys") == set()
    assert report["quic_reads_skipped"] > 0
