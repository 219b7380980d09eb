"""OpenSSL builds of other Debian suites, which keytap's table has no entry for, decrypt.

A stand-in for "a pod whose container is another distribution": the suite's `openssl`, libssl
and libc6, unpacked and run through the suite's own loader (tests/support/debian_suites.py),
serve in the pod (`openssl s_server -www`) to the system's `openssl s_client` in the client
namespace, or are the pod's client (`openssl s_client`) of the system's `s_server -www` there.
Three TLS 1.3 and three TLS 1.2 connections each, one capture per (suite, role), keytap run as
a user runs it: no --offsets. Whatever versions the suites serve today:

- keytap's --keylog-file equals, as a set, the pod library's own -keylogfile;
- tshark decrypts each connection's response from keytap's capture alone, byte for byte what
  the client received;
- the summary counts every session with keys and none whose records refuted its keys;
- keytap said the library had no exact table entry and proved a layout on the wire, for
  both protocols.

The pod as client: keytap finds libraries in /proc/PID/maps, rescanning once per second, so a
client that handshakes at once can finish before its file is probed. The pod therefore also
runs a long-lived process of the same build (the suite's `openssl dgst`, waiting on its stdin,
playing the pod's app), keytap probes that file, and the short-lived clients, which map the
same file, are covered from their first handshake: uprobes belong to the file.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from keytap.tls.libraries import inspect_library
from keytap.tls.offsets import OffsetTable
from tests.support import tls_lab, tshark
from tests.support.debian_suites import SuiteError, SuiteOpenssl, suite_openssl
from tests.support.runner import KeytapProcess
from tests.support.tls_lab import SESSIONS, Session, read_keylog

PORT = 4433
TCP_OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")
SUITES = ("sid", "forky", "trixie", "experimental")
ROLES = ("server", "client")  # what the pod's (the suite's) library is
LINES_PER_CONNECTION = {"1.3": 5, "1.2": 1}
REQUEST = b"GET / HTTP/1.0\r\n\r\n"
CASES = [pytest.param(suite, role, id=f"{suite}-pod-{role}") for suite in SUITES
         for role in ROLES]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tls_lab.make_certificate(tmp_path_factory.mktemp("cert"))


def prepared(suite: str) -> SuiteOpenssl:
    """The suite's OpenSSL, unpacked (before keytap starts: no download beside a capture)."""
    try:
        openssl = suite_openssl(suite)
        libssl = openssl.libssl
    except SuiteError as error:
        pytest.fail(f"Debian {suite}'s OpenSSL is not available: {error}", pytrace=False)
    library = inspect_library(libssl)
    assert library is not None and library.version == openssl.version, (libssl, library)
    if OffsetTable.load().lookup(library.version, library.build_id) is not None:
        pytest.fail(f"premise: the offsets table has an entry for {suite}'s OpenSSL "
                    f"{library.version} (build id {library.build_id}); this test is about "
                    "builds without one: give it a suite whose build has none", pytrace=False)
    return openssl


def flags(session: Session) -> list[str]:
    if session.tls == "1.3":
        return ["-tls1_3", "-ciphersuites", session.cipher]
    return ["-tls1_2", "-cipher", session.cipher]


def s_server(command: list[str], certificate: tuple[Path, Path], keylog: Path) -> list[str]:
    return [*command, "s_server", "-accept", str(PORT), "-cert", str(certificate[0]),
            "-key", str(certificate[1]), "-keylogfile", str(keylog), "-www", "-quiet"]


def s_client(lab: Lab, ns: str, command: list[str], host: str, session: Session,
             keylog: Path) -> bytes:
    """One connection: the request, and what the client received (its stdout)."""
    args = [*command, "s_client", "-connect", f"{host}:{PORT}", "-keylogfile", str(keylog),
            "-quiet", "-ign_eof", *flags(session)]
    result = subprocess.run(lab.command(ns, *args), input=REQUEST, capture_output=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(b"HTTP/"), (
        f"{' '.join(args)} exited with {result.returncode}:\n{result.stderr.decode()}")
    return result.stdout


def wait_until_probed(process: KeytapProcess, libssl: Path) -> None:
    """Until keytap says what it made of the library (its rescan runs once per second)."""
    if f"TLS library {libssl}:" not in process.stderr:
        process.wait_for(f"TLS library {libssl}:", timeout_s=30)


@dataclass
class Run:
    """What one capture's connections left: the logs of both ends and the responses."""

    library_keys: set[str]  # what the pod's (the suite's) OpenSSL logged itself
    peer_keys: set[str]  # what the system's OpenSSL at the other end logged
    client_randoms: list[str]  # per connection, from its client's own key log
    responses: list[bytes]  # per connection, what its client received


def client_random(keylog: Path) -> str:
    randoms = {line.split()[1] for line in read_keylog(keylog)}
    assert len(randoms) == 1, (keylog, randoms)
    return randoms.pop()


def pod_serves(lab: Lab, process: KeytapProcess, openssl: SuiteOpenssl,
               certificate: tuple[Path, Path], tmp_path: Path) -> Run:
    """The suite's s_server in the pod; one system s_client per connection."""
    library_keys = tmp_path / "library.keys"
    lab.spawn(lab.pod, *s_server(openssl.command(), certificate, library_keys))
    lab.wait_for_port(lab.pod, PORT)
    wait_until_probed(process, openssl.libssl)
    keylogs = [tmp_path / f"client-{index}.keys" for index in range(len(SESSIONS))]
    responses = [s_client(lab, lab.client, ["openssl"], lab.pod_ip, session, keylog)
                 for session, keylog in zip(SESSIONS, keylogs, strict=True)]
    return Run(read_keylog(library_keys), set().union(*map(read_keylog, keylogs)),
               [client_random(keylog) for keylog in keylogs], responses)


def pod_connects(lab: Lab, process: KeytapProcess, openssl: SuiteOpenssl,
                 certificate: tuple[Path, Path], tmp_path: Path) -> Run:
    """The system's s_server in the client namespace; one suite s_client per connection in
    the pod, beside a long-lived process of the same build that keytap has probed."""
    peer_keys = tmp_path / "peer.keys"
    lab.spawn(lab.client, *s_server(["openssl"], certificate, peer_keys))
    lab.wait_for_port(lab.client, PORT)
    lab.spawn(lab.pod, *openssl.command("dgst", "-sha256"), stdin=subprocess.PIPE)
    wait_until_probed(process, openssl.libssl)
    keylogs = [tmp_path / f"library-{index}.keys" for index in range(len(SESSIONS))]
    responses = [s_client(lab, lab.pod, openssl.command(), lab.client_ip, session, keylog)
                 for session, keylog in zip(SESSIONS, keylogs, strict=True)]
    return Run(set().union(*map(read_keylog, keylogs)), read_keylog(peer_keys),
               [client_random(keylog) for keylog in keylogs], responses)


def keylog_problems(reference: set[str], got: set[str]) -> list[str]:
    missing = sorted(" ".join(line.split()[:2])[:60] for line in reference - got)
    extra = sorted(" ".join(line.split()[:2])[:60] for line in got - reference)
    return ([f"keytap's key log lacks (or has wrong) {line}..." for line in missing]
            + [f"keytap's key log has an extra {line}..." for line in extra])


def wire_problems(capture: Path, run: Run) -> list[str]:
    """Each connection's response as tshark decrypts it from the capture alone."""
    rows = tshark.fields(capture, "tcp.stream", "tls.handshake.random",
                         display_filter="tls.handshake.type == 1", extra=TCP_OUT_OF_ORDER)
    stream_of = {random.replace(":", "").lower(): int(stream) for stream, random in rows}
    problems = []
    for index, (session, random, expected) in enumerate(
            zip(SESSIONS, run.client_randoms, run.responses, strict=True)):
        where = f"connection {index} (TLS {session.tls} {session.cipher})"
        if random not in stream_of:
            problems.append(f"{where}: its ClientHello is not in the capture")
            continue
        # one stream per tshark run: with several -z follow, tshark prints them last first
        [sides] = tshark.follow_tls(capture, range(stream_of[random], stream_of[random] + 1),
                                    TCP_OUT_OF_ORDER)
        answers = [side for side in sides if side.startswith(b"HTTP/")]
        if not answers:
            problems.append(f"{where}: tshark decrypted no response "
                            f"({[len(side) for side in sides]} bytes per direction)")
        elif answers[0] != expected:
            problems.append(f"{where}: tshark decrypted {len(answers[0])} bytes of response, "
                            f"not the {len(expected)} that the client received")
    return problems


def library_problems(stderr: str, summary: dict, libssl: Path) -> list[str]:
    """keytap found no exact entry and proved a layout on the wire, for TLS 1.3 and 1.2."""
    prefix = f"keytap: TLS library {libssl}: "
    said = [line.removeprefix(prefix) for line in stderr.splitlines() if line.startswith(prefix)]
    problems = []
    if not said or "no exact table entry, proving" not in said[0]:
        problems.append(f"keytap did not say it had no exact table entry for {libssl}")
    proven = [status for status in said if "proven on the wire" in status]
    for protocol in LINES_PER_CONNECTION:
        if not any(f"TLS {protocol}" in status or f"and {protocol})" in status
                   for status in proven):
            problems.append(f"keytap proved no layout of {libssl} on the wire for TLS "
                            f"{protocol}")
    final = summary["tls"].get("libraries", {}).get(str(libssl), "")
    if "proven on the wire" not in final:
        problems.append(f"the summary's status of {libssl}: {final!r}")
    return problems


@pytest.mark.parametrize(("suite", "role"), CASES)
def test_suite_openssl_decrypts_without_table_entry(lab: Lab, keytap, tmp_path: Path,
                                                    certificate, suite: str,
                                                    role: str) -> None:
    openssl = prepared(suite)
    capture, keys, summary_file = (tmp_path / "capture.pcapng", tmp_path / "keytap.keys",
                                   tmp_path / "summary.json")
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--keylog-file",
                     str(keys), "--summary-json", str(summary_file)).start()
    run = (pod_serves if role == "server" else pod_connects)(lab, process, openssl,
                                                             certificate, tmp_path)
    assert process.stop() == 0, process.stderr

    # the test's own premises: both ends logged the same secrets, each connection its share
    expected_lines = sum(LINES_PER_CONNECTION[session.tls] for session in SESSIONS)
    assert len(run.library_keys) == expected_lines, run.library_keys
    assert run.library_keys == run.peer_keys
    assert len(set(run.client_randoms)) == len(SESSIONS)

    summary = json.loads(summary_file.read_text())
    report = summary["tls"]
    problems = keylog_problems(run.library_keys, read_keylog(keys))
    problems += wire_problems(capture, run)
    if not report["sessions_seen"] == report["sessions_with_keys"] == len(SESSIONS):
        problems.append(f"keytap's summary: {report}")
    if sum(counts["failed"] for counts in report["verification"].values()):
        problems.append(f"sessions whose records refuted their written keys: {report}")
    problems += library_problems(process.stderr, summary, openssl.libssl)
    assert not problems, (f"{suite}: {openssl.release} ({openssl.packages}), pod as {role}:\n"
                          + "\n".join(problems) + "\n\nkeytap said:\n" + process.stderr
                          + "\nsummary: " + json.dumps(summary, indent=1))
