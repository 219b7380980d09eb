"""Coverage: real handshakes with every OpenSSL keytap claims, the pod as client and as server.

The statically linked OpenSSL of eight `cryptography` wheels (1.1.1l to 4.0.3, one venv each,
see matrix_env.py), of the newest one PyPI serves (keytap's own venv: unpinned, so whatever
OpenSSL it carries, with or without a table entry) and the system libssl3. Per (version,
role) one keytap capture on the pod's veth holds every TLS feature the version has (plan()):
the five TLS 1.3 suites, three TLS 1.2 ones, the three ways to resume (TLS 1.2 session ID,
TLS 1.2 ticket, TLS 1.3 PSK), a HelloRetryRequest and, from OpenSSL 3.5 on, the default hybrid
group X25519MLKEM768. The peer is the system libssl, but for the hybrid group, which only a
3.5+ peer has: there it is the pod's own library. One client process runs all sessions against
one peer. For every connection:

- keytap's --keylog-file equals, as a set, what the pod's library logged through its own
  keylog callback;
- tshark decrypts its response from keytap's file alone;
- its handshake on the wire is what the session asked for: resumed (no Certificate) or
  not, two ClientHellos for a HelloRetryRequest, a ticket or none before a resumption, the
  group the server's hello names.

The same again with the build's table entry removed, for five of them, the newest, the system's
and one wheel of each other OpenSSL release that cryptography 36 to 51 link (OTHER_WHEELS: 15
more, 1.1.1n to 4.1.1): the layout must be found among candidates and proven on the wire.

A failure lists what differed per connection (missing, wrong or extra key-log lines; which
responses tshark could not decrypt; which handshakes were not as asked), so that a gap in
keytap reads as one.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from keytap.tls.offsets import DEFAULT_PATH
from tests.support import matrix_env, tls_lab, tshark
from tests.support.capi import TLS13_SUITES, Session, response
from tests.support.runner import KeytapProcess
from tests.support.tls_lab import read_keylog

PORT = 4433
TCP_OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")
SYSTEM = "system"
NEWEST = matrix_env.NEWEST  # the venv's own cryptography, as PyPI serves it today
ROLES = ("client", "server")  # what the pod is
LINES_PER_CONNECTION = {"1.3": 5, "1.2": 1}
GROUP_IDS = {"P-256": 23, "X25519MLKEM768": 0x11EC}
CERTIFICATE, NEW_SESSION_TICKET = "11", "4"  # TLS handshake message types

TLS12_CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"
WITH_ANY_PEER = (
    *(Session("1.3", suite) for suite in TLS13_SUITES),
    Session("1.2", TLS12_CIPHER),
    Session("1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
    Session("1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"),
    Session("1.2", TLS12_CIPHER, resume="session-id"),
    Session("1.2", TLS12_CIPHER, resume="ticket"),
    Session("1.3", "TLS_AES_128_GCM_SHA256", resume="psk"),
    Session("1.3", hello_retry=True, group="P-256"),
)
HYBRID = Session("1.3", group="X25519MLKEM768")  # the 3.5+ default, with a 3.5+ peer
HYBRID_SINCE = (3, 5)  # the OpenSSL release that brought ML-KEM


def openssl_of(version: str) -> str:
    if version == SYSTEM:
        return matrix_env.SYSTEM_OPENSSL
    if version == NEWEST:
        return matrix_env.newest_openssl()
    return matrix_env.ALL_WHEELS[version]


def library_of(version: str) -> str:
    """tls_client.py's and tls_server.py's --openssl for the version."""
    return SYSTEM if version == SYSTEM else "cryptography"


def has_hybrid_group(version: str) -> bool:
    major, minor = (int(part) for part in re.findall(r"\d+", openssl_of(version))[:2])
    return (major, minor) >= HYBRID_SINCE


def case_id(version: str, role: str) -> str:
    suffix = {SYSTEM: "-system", NEWEST: "-newest-wheel"}.get(version, "")
    return f"openssl-{openssl_of(version)}{suffix}-{role}"


CASES = [pytest.param(version, role, id=case_id(version, role))
         for version in (*matrix_env.WHEELS, NEWEST, SYSTEM) for role in ROLES]


@dataclass(frozen=True)
class Run:
    """Sessions against one peer: the system libssl, or the pod's own library (its venv)."""

    peer: str  # --openssl: "system" or "cryptography"
    sessions: tuple[Session, ...]

    def python(self, pod_python: str) -> str:
        return pod_python if self.peer == "cryptography" else sys.executable


def plan(version: str) -> tuple[Run, ...]:
    """What a (version, role) case runs, in this order: every feature the version has."""
    system_peer = Run(SYSTEM, WITH_ANY_PEER)
    if not has_hybrid_group(version):  # the one exclusion: no ML-KEM before OpenSSL 3.5
        return (system_peer,)
    return system_peer, Run(library_of(version), (HYBRID,))


def sessions_of(runs: Sequence[Run]) -> list[Session]:
    return [session for run in runs for session in run.sessions]


@dataclass(frozen=True)
class Connection:
    """One TCP connection of a session (a resumed session has two)."""

    session: Session
    resumed: bool = False

    @property
    def name(self) -> str:
        return f"{self.session.id} (resumed)" if self.resumed else self.session.id


def connections_of(sessions: Sequence[Session]) -> list[Connection]:
    return [Connection(session, resumed=index > 0) for session in sessions
            for index in range(session.connections)]


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
        if version in (SYSTEM, NEWEST):
            return sys.executable  # cffi, and libssl.so.3 through dlopen or its cryptography
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
            if version in matrix_env.ALL_WHEELS:
                venvs.prefetch(version)
        venvs.wait()
        yield venvs


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_lab.make_certificate(tmp_path_factory.mktemp("cert"))


def wait_until_probed(process: KeytapProcess, version: str) -> None:
    """A static OpenSSL started after keytap: its 1 s rescan must find and probe it."""
    directory = f"{matrix_env.venv_directory(version)}/"
    process.wait_for(directory)
    line = process.stderr.splitlines()[-1]
    assert f"OpenSSL {openssl_of(version)} (static), probed" in line, process.stderr


def keylog_problems(reference: list[str], got: set[str], by_random: dict[str, Connection]
                    ) -> list[str]:
    """What keytap's key log lacks, has wrong or has extra, per connection."""
    names = {client_random: connection.name for client_random, connection in by_random.items()}
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


def connections_by_random(reference: list[str], connections: Sequence[Connection]
                          ) -> dict[str, Connection]:
    """client random -> connection. Connections ran one after another, in their order, so
    the order in which client randoms first appear in the library's own log names them."""
    order = list(dict.fromkeys(line.split()[1] for line in reference))
    return dict(zip(order, connections, strict=False))


@dataclass
class Handshake:
    """What tshark sees of one TCP stream's TLS handshake (decrypted with the file's keys)."""

    client_random: str = ""
    client_hellos: int = 0
    message_types: set[str] = field(default_factory=set)
    server_group: str = ""  # the last ServerHello's key share group


def handshakes(capture: Path) -> dict[int, Handshake]:
    """TCP stream -> its handshake."""
    rows = tshark.fields(capture, "tcp.stream", "tls.handshake.type", "tls.handshake.random",
                         "tls.handshake.extensions_key_share_group",
                         display_filter="tls.handshake", extra=TCP_OUT_OF_ORDER)
    streams: dict[int, Handshake] = {}
    for stream, types, randoms, groups in rows:
        handshake = streams.setdefault(int(stream), Handshake())
        kinds = types.split(",")
        handshake.message_types.update(kinds)
        if "1" in kinds:  # a ClientHello: alone in its packet
            handshake.client_hellos += 1
            handshake.client_random = randoms.replace(":", "").lower()
        elif "2" in kinds and groups:
            handshake.server_group = groups.split(",")[-1]
    return streams


def handshake_problems(handshake: Handshake, connection: Connection) -> list[str]:
    """Whether the handshake on the wire is the one the session asked for."""
    session, where, problems = connection.session, connection.name, []
    hellos = 2 if session.hello_retry else 1
    if handshake.client_hellos != hellos:
        problems.append(f"{where}: {handshake.client_hellos} ClientHellos, expected {hellos}")
    if (CERTIFICATE in handshake.message_types) == connection.resumed:
        problems.append(f"{where}: not resumed, the server sent its Certificate"
                        if connection.resumed else
                        f"{where}: no Certificate message (resumed, or not decrypted)")
    ticket = session.resume != "session-id"
    if session.resume and not connection.resumed and (
            NEW_SESSION_TICKET in handshake.message_types) != ticket:
        problems.append(f"{where}: the first connection has {'no' if ticket else 'a'} ticket")
    if session.group and handshake.server_group != str(GROUP_IDS[session.group]):
        problems.append(f"{where}: the server's hello names group "
                        f"{handshake.server_group or 'none'}, not {session.group} "
                        f"({GROUP_IDS[session.group]})")
    return problems


def response_problems(sides: list[bytes], where: str) -> list[str]:
    """The response tshark decrypted, against the one the server sent."""
    expected = response()
    answers = [side for side in sides if side.startswith(b"HTTP/")]
    if not answers:
        return [f"{where}: tshark decrypted no response "
                f"({[len(side) for side in sides]} bytes per direction)"]
    if answers[0] != expected:
        return [f"{where}: decrypted response has {len(answers[0])} bytes, "
                f"{'not ' if answers[0][:len(expected)] != expected else ''}"
                f"starting with the {len(expected)} expected"]
    return []


def wire_problems(capture: Path, by_random: dict[str, Connection]) -> list[str]:
    """Each connection's handshake and response, as tshark reads them from the capture."""
    streams = handshakes(capture)
    followed = tshark.follow_tls(capture, range(len(streams)), TCP_OUT_OF_ORDER)
    seen = {handshake.client_random for handshake in streams.values()}
    problems = [f"{by_random[client_random].name}: no ClientHello on the wire"
                for client_random in by_random.keys() - seen]
    for stream, handshake in sorted(streams.items()):
        connection = by_random.get(handshake.client_random)
        if connection is None:
            problems.append(f"TCP stream {stream}: a ClientHello of no logged connection")
            continue
        problems += handshake_problems(handshake, connection)
        problems += response_problems(followed[stream], connection.name)
    return problems


def run_pod_clients(lab: Lab, process: KeytapProcess, version: str, python: str,
                    runs: Sequence[Run], certificate: tuple[Path, Path], tmp_path: Path) -> None:
    """The pod's library as the client of one server per run, in the client namespace."""
    servers = [tls_lab.start_capi_server(lab, lab.client, lab.client_ip, PORT + index,
                                         certificate, tmp_path / "peer.keys", openssl=run.peer,
                                         sessions=run.sessions, python=run.python(python))
               for index, run in enumerate(runs)]
    if version != SYSTEM:
        tls_lab.start_static_openssl_app_in(lab, lab.pod, python)
        wait_until_probed(process, version)
    for index, run in enumerate(runs):
        tls_lab.capi_client(lab, lab.pod, lab.client_ip, PORT + index, "/", run.sessions,
                            tmp_path / "library.keys", tmp_path / f"out-{index}",
                            openssl=library_of(version), python=python)
    for server in servers:
        _, errors = server.communicate(timeout=60)
        assert server.returncode == 0, errors


def run_pod_server(lab: Lab, process: KeytapProcess, version: str, python: str,
                   runs: Sequence[Run], certificate: tuple[Path, Path], tmp_path: Path) -> None:
    """The pod's library as the server of one client process per run."""
    server = tls_lab.start_capi_server(lab, lab.pod, lab.pod_ip, PORT, certificate,
                                       tmp_path / "library.keys", openssl=library_of(version),
                                       sessions=sessions_of(runs), python=python)
    if version != SYSTEM:
        wait_until_probed(process, version)
    for index, run in enumerate(runs):
        tls_lab.capi_client(lab, lab.client, lab.pod_ip, PORT, "/", run.sessions,
                            tmp_path / "peer.keys", tmp_path / f"out-{index}", openssl=run.peer,
                            python=run.python(python))
    _, errors = server.communicate(timeout=60)
    assert server.returncode == 0, errors


# Builds whose table entry is removed: keytap must find their layout among candidates. Around
# 3.2.4, 3.3.3 and 3.4.1 the neighbouring releases have other layouts (a wrong candidate is
# read beside the right one and must be refuted by the proof).
WITHOUT_ENTRY = ("3.4.8", "42.0.8", "43.0.3", "44.0.3", "50.0.2", *matrix_env.OTHER_WHEELS,
                 NEWEST, SYSTEM)
CASES_WITHOUT_ENTRY = [pytest.param(version, role, id=case_id(version, role))
                       for version in WITHOUT_ENTRY for role in ROLES]


def table_without(version: str, path: Path) -> Path:
    """The committed table without the version's entry (by version and by build id)."""
    table = json.loads(DEFAULT_PATH.read_text())
    openssl = openssl_of(version)
    table["versions"].pop(openssl, None)  # 4.0.3 is there by build id only
    table["build_ids"] = {build: entry for build, entry in table["build_ids"].items()
                          if entry.get("version") != openssl}
    path.write_text(json.dumps(table))
    return path


@pytest.mark.parametrize(("version", "role"), CASES)
def test_keys_and_decryption(lab: Lab, keytap, tmp_path: Path, certificate, matrix_venvs: Venvs,
                             version: str, role: str) -> None:
    check_capture(lab, keytap, tmp_path, certificate, matrix_venvs, version, role)


@pytest.mark.parametrize(("version", "role"), CASES_WITHOUT_ENTRY)
def test_builds_with_no_table_entry_decrypt(lab: Lab, keytap, tmp_path: Path, certificate,
                                            matrix_venvs: Venvs, version: str,
                                            role: str) -> None:
    """Every session decrypts, its key log equal to the library's own, with no entry for the
    build: the layout is proven among candidates, no DSB comes from a wrong one, and it is
    remembered for the next capture."""
    table = table_without(version, tmp_path / "table.json")
    stderr = check_capture(lab, keytap, tmp_path, certificate, matrix_venvs, version, role,
                           "--offsets", str(table))
    assert "no exact table entry, proving" in stderr
    assert "proven on the wire" in stderr
    remembered = Path(os.environ["KEYTAP_CACHE_DIR"]) / "proven-layouts.json"
    assert remembered.stat().st_mode & 0o777 == 0o600
    assert openssl_of(version) in remembered.read_text()


def check_capture(lab: Lab, keytap, tmp_path: Path, certificate, matrix_venvs: Venvs,
                  version: str, role: str, *options: str) -> str:
    """One capture of the version's plan, checked connection by connection; keytap's stderr."""
    python, runs = matrix_venvs.python(version), plan(version)
    capture, keys, summary = (tmp_path / "capture.pcapng", tmp_path / "keytap.keys",
                              tmp_path / "summary.json")
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--keylog-file",
                     str(keys), "--summary-json", str(summary), *options).start()
    run = run_pod_clients if role == "client" else run_pod_server
    run(lab, process, version, python, runs, certificate, tmp_path)
    for index, planned in enumerate(runs):
        answers = sum(session.connections for session in planned.sessions)
        assert (tmp_path / f"out-{index}").read_bytes() == response() * answers
    assert process.stop() == 0, process.stderr

    connections = connections_of(sessions_of(runs))
    reference = [line.strip() for line in (tmp_path / "library.keys").read_text().splitlines()
                 if line.strip()]  # what the pod's OpenSSL logged itself
    lines = sum(LINES_PER_CONNECTION[c.session.tls] for c in connections)
    assert len(reference) == lines, reference  # the test's own premise
    by_random = connections_by_random(reference, connections)
    problems = keylog_problems(reference, read_keylog(keys), by_random)
    problems += wire_problems(capture, by_random)
    report = json.loads(summary.read_text())["tls"]
    if not report["sessions_seen"] == report["sessions_with_keys"] == len(connections):
        problems.append(f"keytap's summary: {report}")
    if sum(counts["failed"] for counts in report["verification"].values()):
        problems.append(f"sessions whose records refuted their written keys: {report}")
    assert not problems, "\n".join(problems) + "\n\nkeytap said:\n" + process.stderr
    return process.stderr


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
