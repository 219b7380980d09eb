"""Coverage: real handshakes with every OpenSSL keytap claims, the pod as client and as server.

The statically linked OpenSSL of eight `cryptography` wheels (1.1.1l to 4.0.3, one venv each,
see matrix_env.py) and the system libssl3. Per (version, role) one keytap capture on the pod's
veth holds three TLS 1.3 and three TLS 1.2 sessions, and two things must hold:

- keytap's --keylog-file equals, as a set, what the pod's library logged through its own
  keylog callback;
- tshark decrypts every session's response from keytap's file alone.

A failure lists what differed per session (missing, wrong or extra key-log lines; which
responses tshark could not decrypt), so that a gap in keytap reads as one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from keytap.labnet import Lab
from tests.lab import matrix_env, tls_lab, tshark
from tests.lab.capi import response
from tests.lab.runner import KeytapProcess
from tests.lab.tls_lab import SESSIONS, read_keylog

PORT = 4433
TCP_OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")
SYSTEM = "system"
ROLES = ("client", "server")  # what the pod is
LINES_PER_SESSION = {"1.3": 5, "1.2": 1}


def openssl_of(version: str) -> str:
    return matrix_env.SYSTEM_OPENSSL if version == SYSTEM else matrix_env.WHEELS[version]


def case_id(version: str, role: str) -> str:
    suffix = "-system" if version == SYSTEM else ""
    return f"openssl-{openssl_of(version)}{suffix}-{role}"


CASES = [pytest.param(version, role, id=case_id(version, role))
         for version in (*matrix_env.WHEELS, SYSTEM) for role in ROLES]


class Venvs:
    """cryptography version -> its venv's python. Built at most once per machine (later runs
    reuse them), four at a time, all before the first test: a pip install running beside a
    capture would slow keytap's BPF compilation and the handshakes."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._futures: dict[str, Future] = {}

    def prefetch(self, version: str) -> None:
        if version not in self._futures:
            self._futures[version] = self._pool.submit(matrix_env.venv_python, version)

    def wait(self) -> None:
        futures.wait(self._futures.values())

    def python(self, version: str) -> str:
        """The venv's python; a venv that cannot be made fails the test with pip's message."""
        if version == SYSTEM:
            return sys.executable  # cffi, and libssl.so.3 through dlopen
        self.prefetch(version)
        try:
            return str(self._futures[version].result())
        except matrix_env.VenvError as exc:
            pytest.fail(f"no venv with cryptography {version}:\n{exc}", pytrace=False)


@pytest.fixture(scope="session")
def matrix_venvs(request: pytest.FixtureRequest) -> Iterator[Venvs]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        venvs = Venvs(pool)
        for item in request.session.items:  # what this session's tests need, in their order
            version = getattr(item, "callspec", None) and item.callspec.params.get("version")
            if version in matrix_env.WHEELS:
                venvs.prefetch(version)
        venvs.wait()
        yield venvs


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_lab.make_certificate(tmp_path_factory.mktemp("cert"))


def wait_until_probed(process: KeytapProcess, version: str) -> None:
    """A static OpenSSL started after keytap: its 1 s rescan must find and probe it."""
    directory = f"{matrix_env.CACHE / version}/"
    process.wait_for(directory)
    line = process.stderr.splitlines()[-1]
    assert f"OpenSSL {openssl_of(version)} (static), probed" in line, process.stderr


def keylog_problems(reference: list[str], got: set[str], names: dict[str, str]) -> list[str]:
    """What keytap's key log lacks, has wrong or has extra, per session."""
    expected = {tuple(line.split()[:2]): line.split()[2] for line in reference}
    found: dict[tuple[str, ...], set[str]] = {}
    for line in got:
        label, client_random, secret = line.split()
        found.setdefault((label, client_random), set()).add(secret)
    problems = []
    for (label, client_random), secret in expected.items():
        where = names.get(client_random, client_random[:16])
        if (label, client_random) not in found:
            problems.append(f"{where}: keytap lacks {label}")
        elif found[(label, client_random)] != {secret}:
            problems.append(f"{where}: keytap's {label} is wrong")
    for label, client_random in found.keys() - expected.keys():
        where = names.get(client_random, f"unknown client random {client_random[:16]}")
        problems.append(f"{where}: keytap has an extra {label}")
    return problems


def session_names(reference: list[str]) -> dict[str, str]:
    """client random -> session id. Sessions ran one after another, in SESSIONS order, so
    the order in which client randoms first appear in the library's own log names them."""
    order = list(dict.fromkeys(line.split()[1] for line in reference))
    return {client_random: SESSIONS[index].id if index < len(SESSIONS) else f"session {index}"
            for index, client_random in enumerate(order)}


def decryption_problems(capture: Path, names: dict[str, str]) -> list[str]:
    """Each session's response, as tshark decrypts it from the capture alone."""
    hellos = tshark.fields(capture, "tcp.stream", "tls.handshake.random",
                           display_filter="tls.handshake.type == 1")
    streams = {int(stream): random.replace(":", "").lower() for stream, random in hellos}
    followed = tshark.follow_tls(capture, range(len(streams)), TCP_OUT_OF_ORDER)
    expected, problems = response(), []
    if len(streams) != len(SESSIONS):
        problems.append(f"{len(streams)} ClientHellos in the capture, {len(SESSIONS)} sessions")
    for stream, sides in enumerate(followed):
        where = names.get(streams.get(stream, ""), f"TCP stream {stream}")
        answers = [side for side in sides if side.startswith(b"HTTP/")]
        if not answers:
            problems.append(f"{where}: tshark decrypted no response "
                            f"({[len(side) for side in sides]} bytes per direction)")
        elif answers[0] != expected:
            problems.append(f"{where}: decrypted response has {len(answers[0])} bytes, "
                            f"{'not ' if answers[0][:len(expected)] != expected else ''}"
                            f"starting with the {len(expected)} expected")
    return problems


@pytest.mark.parametrize(("version", "role"), CASES)
def test_keys_and_decryption(lab: Lab, keytap, tmp_path: Path, certificate, matrix_venvs: Venvs,
                             version: str, role: str) -> None:
    python = matrix_venvs.python(version)
    openssl = "system" if version == SYSTEM else "cryptography"
    capture, keys, summary = (tmp_path / "capture.pcapng", tmp_path / "keytap.keys",
                              tmp_path / "summary.json")
    reference = tmp_path / "library.keys"  # what the pod's OpenSSL logged itself
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--keylog-file",
                     str(keys), "--summary-json", str(summary)).start()

    if role == "client":  # the peer serves from the client namespace with the system libssl
        server = tls_lab.start_capi_server(lab, lab.client, lab.client_ip, PORT, certificate,
                                           tmp_path / "peer.keys", openssl="system",
                                           count=len(SESSIONS))
        if version != SYSTEM:
            tls_lab.start_static_openssl_app_in(lab, lab.pod, python)
            wait_until_probed(process, version)
        for index, session in enumerate(SESSIONS):
            tls_lab.capi_client_in(lab, lab.pod, python, lab.client_ip, PORT, "/", session,
                                   reference, tmp_path / f"out-{index}", openssl=openssl)
    else:  # the pod serves; the peer is a system-libssl client in the client namespace
        server = tls_lab.start_capi_server(lab, lab.pod, lab.pod_ip, PORT, certificate,
                                           reference, openssl=openssl, count=len(SESSIONS),
                                           python=python)
        if version != SYSTEM:
            wait_until_probed(process, version)
        for index, session in enumerate(SESSIONS):
            tls_lab.capi_client_in(lab, lab.client, sys.executable, lab.pod_ip, PORT, "/",
                                   session, tmp_path / "peer.keys", tmp_path / f"out-{index}",
                                   openssl="system")
    _, server_errors = server.communicate(timeout=60)
    assert server.returncode == 0, server_errors
    assert all((tmp_path / f"out-{i}").read_bytes() == response() for i in range(len(SESSIONS)))
    assert process.stop() == 0, process.stderr

    lines = [line.strip() for line in reference.read_text().splitlines() if line.strip()]
    assert len(lines) == sum(LINES_PER_SESSION[s.tls] for s in SESSIONS), lines  # the test's
    names = session_names(lines)
    problems = keylog_problems(lines, read_keylog(keys), names)
    problems += decryption_problems(capture, names)
    report = json.loads(summary.read_text())["tls"]
    if not report["sessions_seen"] == report["sessions_with_keys"] == len(SESSIONS):
        problems.append(f"keytap's summary: {report}")
    assert not problems, "\n".join(problems) + "\n\nkeytap said:\n" + process.stderr


def test_pip_installed_50_0_2_is_the_build_id_in_the_table(matrix_venvs: Venvs) -> None:
    """OpenSSL 4.0.3 is in the offsets table by build id only (the .venv's cryptography);
    the wheel pip installs for the matrix is that same build."""
    from keytap.tls.libraries import inspect_library
    from keytap.tls.offsets import OffsetTable

    matrix_venvs.python("50.0.2")
    library = inspect_library(matrix_env.static_library("50.0.2"))
    assert library is not None and library.version == "4.0.3"
    table = OffsetTable.load()
    assert library.build_id in table.build_ids()
    assert table.lookup("4.0.3") is None  # no version entry: the build id carries it
    assert table.lookup("4.0.3", library.build_id) is not None

