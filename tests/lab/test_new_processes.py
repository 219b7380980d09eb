"""No handshake escapes: processes that start after keytap and handshake at once.

keytap is started first; then 20 one-shot clients in a row, each a new process in the pod that
handshakes in its first moments, with a TLS library no running process had mapped when keytap
looked. tshark decrypts 20 of 20 from the file alone, and keytap's key log equals the clients'
own. The libraries: a binary with OpenSSL linked in statically (a `cryptography` wheel), a
wheel's bundled shared libssl loaded with dlopen, a copy of the system libssl found through
LD_LIBRARY_PATH, and another distribution's OpenSSL inside a new mount namespace's root (a
container started after keytap).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from tests import support
from tests.support import debian_suites, matrix_env, quic_env, tls_lab, tshark
from tests.support.capi import Session, sessions_to_json
from tests.support.tls_lab import read_keylog

PORT = 4433
CLIENTS = 20
BODY = "hello, new process\n"
SESSION = Session("1.3", "TLS_AES_128_GCM_SHA256")
SUITE = "sid"  # another distribution's OpenSSL, for the container case
TLS_CLIENT = str(Path(support.__file__).with_name("tls_client.py"))
OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")
LINKS_PER_LIBSSL = 3  # uprobe_multi: SSL_do_handshake's entry, its return, the I/O calls' entry

# case -> a function (lab, tmp_path, index) -> the command of one one-shot client, whose own key
# log goes to tmp_path / "clients.keys"
Client = Callable[[Lab, Path, int], list[str]]


def capi_client(python: str, openssl: str, *prefix: str) -> Client:
    def command(lab: Lab, tmp_path: Path, index: int) -> list[str]:
        return [*prefix, python, TLS_CLIENT, "--openssl", openssl, "--sessions",
                sessions_to_json((SESSION,)), "--keylog", str(tmp_path / "clients.keys"),
                "--out", str(tmp_path / f"out-{index}"), lab.client_ip, str(PORT),
                "/index.html"]
    return command


def static_wheel(tmp_path: Path) -> Client:
    return capi_client(str(matrix_env.venv_python("45.0.7")), "cryptography")


def wheel_libssl_dlopen(tmp_path: Path) -> Client:
    return capi_client(sys.executable, str(quic_env.libssl()))


def libssl_on_ld_library_path(tmp_path: Path) -> Client:
    directory = tmp_path / "libs"
    directory.mkdir()
    for name in ("libssl.so.3", "libcrypto.so.3"):
        shutil.copy2(Path("/usr/lib/x86_64-linux-gnu") / name, directory / name)
    return capi_client(sys.executable, "system", "env", f"LD_LIBRARY_PATH={directory}")


def container_root(tmp_path: Path) -> Client:
    """The suite's `openssl s_client`, chrooted into the suite's root in a new mount namespace:
    its libc, loader and libssl are the root's own. Its key log is written inside the root."""
    suite = debian_suites.suite_openssl(SUITE)
    root = suite.root
    (root / "tmp").mkdir(exist_ok=True)
    libs = root / "usr/lib" / debian_suites.MULTIARCH
    for name in ("libz.so.1", "libzstd.so.1"):  # the suite's openssl takes these from the host
        if not (libs / name).exists():
            shutil.copy2(Path("/usr/lib") / debian_suites.MULTIARCH / name, libs / name)
    loader = "/" + str(suite.loader.relative_to(root))  # merged /usr: no /lib64 in the root

    def command(lab: Lab, tmp_path: Path, index: int) -> list[str]:
        keys = f"/tmp/{run_name(tmp_path)}-{index}.keys"
        return ["unshare", "--mount", "chroot", str(root), loader, "/usr/bin/openssl", "s_client",
                "-quiet", "-ign_eof", "-tls1_3", "-keylogfile", keys, "-connect",
                f"{lab.client_ip}:{PORT}"]
    return command


def run_name(tmp_path: Path) -> str:
    """Unique to this test run: the root's /tmp is shared by every run."""
    return f"{tmp_path.parent.name}-{tmp_path.name}"


def gather_container_keys(tmp_path: Path) -> None:
    """The key logs the chrooted clients wrote inside the root, into clients.keys."""
    root = debian_suites.suite_openssl(SUITE).root
    with (tmp_path / "clients.keys").open("a") as own:
        for path in sorted((root / "tmp").glob(f"{run_name(tmp_path)}-*.keys")):
            own.write(path.read_text())
            path.unlink()


CASES = {"static-wheel": static_wheel, "wheel-libssl-dlopen": wheel_libssl_dlopen,
         "libssl-on-ld-library-path": libssl_on_ld_library_path,
         "container-root": container_root}


def serve_body(lab: Lab, tmp_path: Path) -> None:
    """The HTTPS server the pod's clients ask for /index.html (BODY), outside the pod."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text(BODY)
    tls_lab.start_python_server(lab, lab.client, lab.client_ip, PORT,
                                tls_lab.make_certificate(tmp_path), tmp_path / "server.keys",
                                www)


@pytest.mark.parametrize("case", CASES)
def test_one_shot_clients_started_after_keytap_all_decrypt(lab: Lab, keytap, tmp_path: Path,
                                                           case: str) -> None:
    client = CASES[case](tmp_path)
    serve_body(lab, tmp_path)
    capture, keys = tmp_path / "c.pcapng", tmp_path / "keys"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--keylog-file",
                     str(keys), "--summary-json", str(tmp_path / "summary.json")).start()
    for index in range(CLIENTS):
        # s_client exits 1 when the server closes after its answer: tshark is the judge
        lab.run(lab.pod, *client(lab, tmp_path, index),
                input="GET /index.html HTTP/1.0\r\n\r\n", check=case != "container-root")
    assert process.stop() == 0, process.stderr
    if case == "container-root":
        gather_container_keys(tmp_path)
    own = tmp_path / "clients.keys"
    assert len(read_keylog(own)) == 5 * CLIENTS  # the test's premise
    assert read_keylog(keys) == read_keylog(own), process.stderr
    bodies = tshark.export_http_objects(capture, tmp_path / "objects", OUT_OF_ORDER)
    assert [body.read_text() for body in bodies] == [BODY] * CLIENTS, process.stderr
    gate = json.loads((tmp_path / "summary.json").read_text())["tls"]["launch_gate"]
    assert gate["held"] >= 1 and gate["allowed_after_max_hold"] == 0, gate  # caught, answered



def fd_limit_leaving(pid: int, free: int) -> int:
    """The fd limit at which the process can open `free` more fds (new fds take the lowest
    free numbers, and each must be below the limit)."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    limit = 0
    while limit - len([fd for fd in used if fd < limit]) < free:
        limit += 1
    return limit


def test_a_library_whose_probes_cannot_be_attached_is_said_and_the_capture_goes_on(
        lab: Lab, keytap, tmp_path: Path) -> None:
    """A uprobe link is an fd: at keytap's fd limit (here lowered while it runs, to room for
    the links of three more library files) a new library file is named with the reason,
    while the files probed before decrypt (and what did attach to a file still reads, proven
    like the rest), and the capture goes on to a complete file. It used to be a silent error
    of the launch gate, or a traceback that ended the capture when the rescan met it."""
    serve_body(lab, tmp_path)
    copies = []
    for index in range(5):
        copies.append(tmp_path / "libs" / str(index))
        copies[-1].mkdir(parents=True)
        shutil.copy2(Path("/usr/lib/x86_64-linux-gnu/libssl.so.3"), copies[-1])
    capture, summary = tmp_path / "c.pcapng", tmp_path / "summary.json"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--summary-json",
                     str(summary)).start()
    assert process.process is not None
    pid = process.process.pid
    limit = fd_limit_leaving(pid, LINKS_PER_LIBSSL * 3 + 3)
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
    for directory in copies:
        lab.run(lab.pod, "env", f"LD_LIBRARY_PATH={directory}", "curl", "-skf", "-o",
                "/dev/null", f"https://{lab.client_ip}:{PORT}/index.html")
    process.wait_for("could not all be attached")  # said while capturing
    assert process.stop() == 0, process.stderr
    refused = [line for line in process.stderr.splitlines() if "could not all be attached" in line]
    named = {copy for copy in copies for line in refused if str(copy) in line}
    assert named and named <= set(copies[3:]), process.stderr  # room for three
    assert all("Too many open files" in line for line in refused), refused
    for copy in copies[:3]:
        assert f"TLS library {copy}/libssl.so.3: OpenSSL" in process.stderr, process.stderr
    report = json.loads(summary.read_text())["tls"]
    assert report["sessions_seen"] == 5 and report["sessions_with_keys"] >= 3, report
    bodies = tshark.export_http_objects(capture, tmp_path / "objects", OUT_OF_ORDER)
    assert [body.read_text() for body in bodies] == [BODY] * report["sessions_with_keys"]
