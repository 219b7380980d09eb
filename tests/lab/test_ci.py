"""keytap in CI: the pytest plugin on examples/ci_service, and `keytap capture -- CMD`.

tshark is the judge, with nothing but the file: every TLS session decrypts, every request and
response of the run is there, and each test's traffic sits between its two markers. Everything
here talks over lo to 127.0.0.1 only (the host's loopback, keytap's default interface).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keytap import READY_LINE
from keytap.cli import EXIT_UNDECRYPTABLE
from tests.support import tshark
from tests.support.runner import keytap_command
from tests.support.tls_lab import HERE, SYSTEM_PYTHON, make_certificate

REPO = HERE.parents[1]
EXAMPLE = "examples/ci_service"
TCP_OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")
FIELDS = ("frame.number", "frame.interface_name", "frame.comment", "tcp.stream",
          "tls.handshake.type", "tls.handshake.extensions.supported_version",
          "http.request.method", "http.request.uri", "http.response.code")
BODY = "http.file_data"  # only for text bodies: tshark prints it as is, newlines included
# what examples/ci_service/test_service.py does, test by test, in file order
SUITE = {
    f"{EXAMPLE}/test_service.py::test_health_tls13": ("GET", "/health", "200", "1.3",
                                                      '{"status": "ok"}'),
    f"{EXAMPLE}/test_service.py::test_list_items_tls12": (
        "GET", "/items", "200", "1.2", '[{"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}]'),
    f"{EXAMPLE}/test_service.py::test_create_item_tls13": ("POST", "/items", "201", "1.3",
                                                           '{"id": 3, "name": "plum"}'),
}
TLS13 = "0x0304"  # ServerHello's supported_versions; absent in a TLS 1.2 ServerHello
BODY_SIZE = 256 * 1024
CLIENT = """\
import os, signal, ssl, sys, urllib.request
url, directory, ending = sys.argv[1:]
for name, version in (("tls12", ssl.TLSVersion.TLSv1_2), ("tls13", ssl.TLSVersion.TLSv1_3)):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    with urllib.request.urlopen(f"{url}/{name}.bin", context=context, timeout=30) as response:
        open(os.path.join(directory, name + ".bin"), "wb").write(response.read())
if ending == "SIGTERM":
    os.kill(os.getpid(), signal.SIGTERM)
sys.exit(int(ending))
"""


def run_pytest(*args: str, user: list[str] | None = None) -> subprocess.CompletedProcess:
    """The example suite as a user runs it from the repository (the entry point loads keytap)."""
    return subprocess.run([*(user or []), sys.executable, "-m", "pytest", EXAMPLE,
                           "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def rows_of(capture: Path, *extra_fields: str) -> list[dict[str, str]]:
    """One dict per frame, what tshark decodes (and decrypts) from the file alone."""
    names = FIELDS + extra_fields
    return [dict(zip(names, row, strict=True))
            for row in tshark.fields(capture, *names, extra=TCP_OUT_OF_ORDER)]


def client_hello_streams(rows: list[dict[str, str]]) -> list[str]:
    return [r["tcp.stream"] for r in rows if "1" in r["tls.handshake.type"].split(",")]


# --- the pytest plugin ------------------------------------------------------------------------


def test_plugin_captures_each_test_between_its_markers(tmp_path: Path) -> None:
    capture, summary = tmp_path / "suite.pcapng", tmp_path / "summary.json"
    result = run_pytest("--keytap", str(capture), "--keytap-summary-json", str(summary),
                        "--keytap-fail-on-undecryptable")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert "TLS sessions on the wire: 3, with keys 3, without 0" in result.stdout

    rows = rows_of(capture, BODY)
    markers = [(int(r["frame.number"]), r["frame.comment"]) for r in rows
               if r["frame.interface_name"] == "keytap-markers"]
    assert [text for _, text in markers] == [
        text for nodeid in SUITE for text in (f"start {nodeid}", f"end {nodeid} passed")]
    # one TLS session per test, each fully decrypted: its request and its response
    hellos = client_hello_streams(rows)
    requests = {r["tcp.stream"]: r for r in rows if r["http.request.method"]}
    responses = {r["tcp.stream"]: r for r in rows if r["http.response.code"]}
    assert len(hellos) == len(set(hellos)) == len(SUITE)
    assert set(hellos) == set(requests) == set(responses)

    frames = {text: number for number, text in markers}
    for nodeid, (method, uri, code, version, body) in SUITE.items():
        stream = next(s for s, r in requests.items()
                      if (r["http.request.method"], r["http.request.uri"]) == (method, uri))
        response = responses[stream]
        assert (response["http.response.code"], response[BODY]) == (code, body)
        server_hello = next(r for r in rows if r["tcp.stream"] == stream
                            and "2" in r["tls.handshake.type"].split(","))
        assert (TLS13 in server_hello["tls.handshake.extensions.supported_version"]) == (
            version == "1.3"), nodeid
        hello = next(int(r["frame.number"]) for r in rows if r["tcp.stream"] == stream)
        inside = (hello, int(requests[stream]["frame.number"]), int(response["frame.number"]))
        assert (frames[f"start {nodeid}"] < min(inside) and max(inside)
                < frames[f"end {nodeid} passed"]), (nodeid, inside, markers)

    report = json.loads(summary.read_text())["tls"]
    assert report["sessions_seen"] == report["sessions_with_keys"] == len(SUITE)


def test_plugin_does_nothing_without_the_option() -> None:
    """Loaded by the entry point in every run, it must not start, import or print anything."""
    code = ("import sys, pytest\n"
            f"code = pytest.main([{EXAMPLE!r}, '-q', '-p', 'no:cacheprovider'])\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('bcc', 'keytap'))\n"
            "print('loaded:', loaded)\n"
            "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded: ['keytap', 'keytap.pytest_plugin']" in result.stdout
    assert "keytap:" not in result.stdout + result.stderr


def test_plugin_needs_root(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = run_pytest("--keytap", str(tmp_path / "x.pcapng"), user=nobody)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "--keytap needs root" in result.stderr
    assert not (tmp_path / "x.pcapng").exists()


# --- keytap capture -- CMD ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_listener(port: int, timeout_s: float = 10) -> None:
    """Until something listens on 127.0.0.1:port (asked of ss: no connection made)."""
    deadline = time.monotonic() + timeout_s
    while f"127.0.0.1:{port} " not in subprocess.run(["ss", "-Hltn"], capture_output=True,
                                                     text=True).stdout:
        assert time.monotonic() < deadline, f"nothing listens on 127.0.0.1:{port}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, bytes]]]:
    """tests/lab/https_server.py on 127.0.0.1 (system python, libssl3): URL and the files."""
    directory = tmp_path_factory.mktemp("ci-server")
    www = directory / "www"
    www.mkdir()
    files = {name: os.urandom(BODY_SIZE) for name in ("tls12.bin", "tls13.bin")}
    for name, content in files.items():
        (www / name).write_bytes(content)
    cert, key = make_certificate(directory)
    port = free_port()
    process = subprocess.Popen(
        [SYSTEM_PYTHON, str(HERE / "https_server.py"), "--cert", str(cert), "--key", str(key),
         "--keylog", str(directory / "server.keys"), "--bind", "127.0.0.1", "--port", str(port),
         str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_for_listener(port)
        yield f"https://127.0.0.1:{port}", files
    finally:
        process.kill()
        process.wait()


def capture_client(tmp_path: Path, url: str, ending: str, *options: str
                   ) -> tuple[subprocess.CompletedProcess, Path, dict]:
    """keytap capture [options] -o FILE -- client.py (two sessions: TLS 1.2, then 1.3)."""
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    received = tmp_path / "received"
    received.mkdir()
    capture, summary = tmp_path / "client.pcapng", tmp_path / "summary.json"
    result = subprocess.run(
        keytap_command("capture", "-o", str(capture), "--summary-json", str(summary), *options,
                       "--", SYSTEM_PYTHON, str(client), url, str(received), ending),
        capture_output=True, text=True, timeout=300)
    assert READY_LINE in result.stderr, result.stderr
    assert sorted(p.name for p in received.iterdir()) == ["tls12.bin", "tls13.bin"]
    return result, capture, json.loads(summary.read_text())["tls"]


@pytest.mark.parametrize(("ending", "expected"), [("0", 0), ("1", 1),
                                                  ("SIGTERM", 128 + signal.SIGTERM)])
def test_capture_runs_the_command_and_exits_with_its_code(
        tmp_path: Path, server, ending: str, expected: int) -> None:
    url, files = server
    result, capture, report = capture_client(tmp_path, url, ending)
    assert result.returncode == expected, result.stderr
    exported = tshark.export_http_objects(capture, tmp_path / "objects", TCP_OUT_OF_ORDER)
    assert {p.name: p.read_bytes() for p in exported} == files
    rows = rows_of(capture)
    assert len(client_hello_streams(rows)) == len(files)
    assert sorted(r["http.request.uri"] for r in rows if r["http.request.method"]) == [
        "/tls12.bin", "/tls13.bin"]
    assert report["sessions_seen"] == report["sessions_with_keys"] == len(files)


def test_a_signal_to_keytap_goes_to_the_command(tmp_path: Path) -> None:
    """SIGTERM to keytap (a CI runner cancelling): the command gets it, keytap ends with it."""
    sleeper = "import time\nprint('started', flush=True)\ntime.sleep(120)\n"
    capture = tmp_path / "signal.pcapng"
    process = subprocess.Popen(
        keytap_command("capture", "-o", str(capture), "--", SYSTEM_PYTHON, "-c", sleeper),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert process.stdout.readline() == "started\n"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert tshark.fields(capture, "frame.number") == []  # a valid (empty) capture file



def test_the_command_keeps_the_fd_limit_keytap_was_started_with(tmp_path: Path) -> None:
    """keytap raises its own fd limit (a uprobe is an fd, and a node has many TLS library
    files); the command it runs gets the limit keytap was given, as it would without keytap."""
    show = "import resource\nprint(*resource.getrlimit(resource.RLIMIT_NOFILE))"
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = "ulimit -S -n 1024 && exec \"$@\""  # below the hard limit: keytap raises it
    result = subprocess.run(
        ["sh", "-c", low, "sh", *keytap_command("capture", "-o", str(tmp_path / "c.pcapng"),
                                                "--", SYSTEM_PYTHON, "-c", show)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1024", str(hard)], result.stderr
    assert hard > 1024  # the premise: keytap could raise its own


# --- --fail-on-undecryptable ------------------------------------------------------------------


def test_fail_on_undecryptable_passes_when_every_session_has_keys(tmp_path: Path,
                                                                 server) -> None:
    result, _, report = capture_client(tmp_path, server[0], "0", "--fail-on-undecryptable")
    assert result.returncode == 0, result.stderr
    assert report["sessions_without_keys"] == 0


def test_fail_on_undecryptable_fails_without_keys(tmp_path: Path, server) -> None:
    """An offsets table with no versions: no library is instrumented, so no session has keys."""
    no_offsets = tmp_path / "empty-offsets.json"
    no_offsets.write_text(json.dumps({"generator": "test", "layouts": {}, "versions": {},
                                      "build_ids": {}}))
    options = ("--offsets", str(no_offsets), "--key-wait", "0.2")
    result, capture, report = capture_client(tmp_path, server[0], "0", *options)
    assert result.returncode == 0, result.stderr  # without the option: a warning only
    assert report["sessions_without_keys"] == 2
    assert not [r for r in rows_of(capture) if r["http.request.method"]]  # nothing decrypts

    failing = tmp_path / "failing"
    failing.mkdir()
    result, _, report = capture_client(failing, server[0], "0", "--fail-on-undecryptable",
                                       *options)
    assert result.returncode == EXIT_UNDECRYPTABLE, result.stderr
    assert report["sessions_without_keys"] == 2
    assert "2 TLS sessions have no keys" in result.stderr
