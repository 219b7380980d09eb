"""TLS endpoints for the lab: certificates, servers and clients that log their own secrets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from keytap.demo.labnet import Lab, sh
from tests.support.capi import Session, sessions_to_json

HERE = Path(__file__).parent
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: links the system libssl3 dynamically


SESSIONS = (
    Session("1.3", "TLS_AES_128_GCM_SHA256"),
    Session("1.3", "TLS_AES_256_GCM_SHA384"),
    Session("1.3", "TLS_CHACHA20_POLY1305_SHA256"),
    Session("1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    Session("1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
    Session("1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"),
)


@dataclass(frozen=True)
class PeerRoles:
    """Where a test's server and client run, and the key log each end writes: the pod's end
    in `pod_role`, the other in the client namespace."""

    server_ns: str
    server_ip: str
    client_ns: str
    server_keys: Path
    client_keys: Path
    pod_keys: Path  # one of the two above: the pod's end's
    other_keys: Path

    @classmethod
    def of(cls, lab: Lab, directory: Path, pod_role: str) -> PeerRoles:
        pod, other = directory / "pod.keys", directory / "other.keys"
        if pod_role == "server":
            return cls(lab.pod, lab.pod_ip, lab.client, pod, other, pod, other)
        return cls(lab.client, lab.client_ip, lab.pod, other, pod, pod, other)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
       "-nodes", "-days", "2", "-subj", "/CN=keytap-lab", "-keyout", str(key), "-out", str(cert))
    return cert, key


def read_keylog(path: Path) -> set[str]:
    """Key-log lines of a file, comments and blank lines left out."""
    return {line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def start_python_server(lab: Lab, ns: str, ip: str, port: int, cert: tuple[Path, Path],
                        keylog: Path, directory: Path, session: Session | None = None,
                        **spawn: object) -> None:
    """`spawn`: for lab.spawn (stderr=subprocess.DEVNULL for a long run: it logs each request,
    and a pipe nobody reads fills up and stalls it)."""
    args = ["--cert", str(cert[0]), "--key", str(cert[1]), "--keylog", str(keylog),
            "--bind", ip, "--port", str(port)]
    if session is not None:
        args += ["--tls", session.tls]
        if session.tls == "1.2":
            args += ["--cipher", session.cipher]
    lab.spawn(ns, SYSTEM_PYTHON, str(HERE / "https_server.py"), *args, str(directory), **spawn)
    lab.wait_for_port(ns, port, ip)


def start_openssl_server(lab: Lab, ns: str, port: int, cert: tuple[Path, Path], keylog: Path,
                         session: Session) -> None:
    """openssl s_server -www: the BIO_f_ssl path, whose handshakes are implicit."""
    version = ["-tls1_3", "-ciphersuites", session.cipher] if session.tls == "1.3" else [
        "-tls1_2", "-cipher", session.cipher]
    lab.spawn(ns, "openssl", "s_server", "-accept", str(port), "-cert", str(cert[0]),
              "-key", str(cert[1]), "-keylogfile", str(keylog), "-www", "-quiet", *version)
    lab.wait_for_port(ns, port)


def start_openssl_www_server(lab: Lab, ns: str, port: int, cert: tuple[Path, Path],
                             directory: Path) -> None:
    """openssl s_server -WWW: serves files from its working directory (system libssl)."""
    lab.spawn(ns, "openssl", "s_server", "-accept", str(port), "-cert", str(cert[0]),
              "-key", str(cert[1]), "-WWW", "-quiet", cwd=directory)
    lab.wait_for_port(ns, port)


def curl(lab: Lab, ns: str, url: str, session: Session, output: Path) -> None:
    version = (["--tlsv1.3", "--tls13-ciphers", session.cipher] if session.tls == "1.3"
               else ["--tlsv1.2", "--tls-max", "1.2", "--ciphers", session.cipher])
    lab.run(ns, "curl", "-sfk", *version, "-o", str(output), url)


def python_ssl_client(lab: Lab, ns: str, host: str, port: int, path: str, session: Session,
                      keylog: Path, output: Path) -> None:
    """Python's ssl module (system libssl3) as the client."""
    code = f"""
import ssl, urllib.request
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.keylog_filename = {str(keylog)!r}
version = ssl.TLSVersion.TLSv1_3 if {session.tls!r} == "1.3" else ssl.TLSVersion.TLSv1_2
context.minimum_version = context.maximum_version = version
if {session.tls!r} == "1.2":
    context.set_ciphers({session.cipher!r})
body = urllib.request.urlopen("https://{host}:{port}{path}", context=context).read()
open({str(output)!r}, "wb").write(body)
"""
    lab.run(ns, SYSTEM_PYTHON, "-c", code)


def openssl_client(lab: Lab, ns: str, host: str, port: int, session: Session,
                   keylog: Path) -> None:
    version = ["-tls1_3", "-ciphersuites", session.cipher] if session.tls == "1.3" else [
        "-tls1_2", "-cipher", session.cipher]
    # check=False: Python's server closes without close_notify, which s_client reports as an
    # error after the exchange; the test judges by the key logs.
    lab.run(ns, "openssl", "s_client", "-connect", f"{host}:{port}", "-keylogfile", str(keylog),
            "-quiet", "-ign_eof", *version, input="GET / HTTP/1.0\r\n\r\n", check=False)


def start_static_openssl_app(lab: Lab, ns: str) -> None:
    """A long-running process that has cryptography's static OpenSSL mapped, like a pod's app."""
    lab.spawn(ns, sys.executable, "-c", "import time\n"
              "from cryptography.hazmat.bindings.openssl.binding import Binding\n"
              "time.sleep(300)")


def capi_client(lab: Lab, ns: str, host: str, port: int, path: str,
                sessions: Sequence[Session], keylog: Path, output: Path, *, openssl: str,
                python: str = sys.executable, implicit: bool = False,
                one_ssl: bool = False) -> None:
    """tls_client.py: OpenSSL's C API, system libssl or cryptography's static copy, runs the
    sessions in one process and writes their responses, one after another, to `output`.
    `python` picks the cryptography wheel (its venv) for openssl="cryptography"; `implicit`
    and `one_ssl`: tls_client.py's --implicit and --one-ssl."""
    args = ["--openssl", openssl, "--sessions", sessions_to_json(sessions), "--keylog",
            str(keylog), "--out", str(output)]
    if implicit:
        args.append("--implicit")
    if one_ssl:
        args.append("--one-ssl")
    lab.run(ns, python, str(HERE / "tls_client.py"), *args, host, str(port), path)


def start_capi_server(lab: Lab, ns: str, ip: str, port: int, cert: tuple[Path, Path],
                      keylog: Path, *, openssl: str, sessions: Sequence[Session],
                      python: str = sys.executable) -> subprocess.Popen:
    """tls_server.py: OpenSSL's C API serving its fixed body to the connections of
    `sessions` (what the client gets), in their order, then it exits. `python` picks the
    cryptography wheel (its venv) for openssl="cryptography"."""
    process = lab.spawn(ns, python, str(HERE / "tls_server.py"), "--openssl", openssl,
                        "--sessions", sessions_to_json(sessions), "--cert", str(cert[0]),
                        "--key", str(cert[1]), "--keylog", str(keylog), "--bind", ip,
                        "--port", str(port))
    lab.wait_for_port(ns, port, ip)
    return process


def start_static_openssl_app_in(lab: Lab, ns: str, python: str) -> None:
    """start_static_openssl_app with another venv's python, i.e. another cryptography wheel."""
    lab.spawn(ns, python, "-c", "import time\n"
              "from cryptography.hazmat.bindings.openssl.binding import Binding\n"
              "time.sleep(600)")
