#!/usr/bin/env python3
"""Generate tests/support/tls_vectors.json: real TLS sessions with their records and key lines.

Runs the system `openssl s_server` and `openssl s_client` on 127.0.0.1 (nothing else is ever
contacted), with a small relay between them that copies both directions and keeps the bytes,
so every record is exactly as it crossed the socket. The client writes the key log
(`-keylogfile`); the server's is compared with it. Each vector is one connection: the records
each side sent from its first hello on, cut at record boundaries, and the key-log lines of that
connection's client random.

Run once, by hand, when the vectors need to change (the output is committed test data):

    .venv/bin/python tools/gen_tls_vectors.py [--out tests/support/tls_vectors.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
TIMEOUT = 20.0
REQUEST = b"GET /hello.txt HTTP/1.0\r\n\r\n"
BODY = b"hello from keytap's vector generator\n"


@dataclass(frozen=True)
class Case:
    name: str
    client: tuple[str, ...] = ()  # extra s_client options
    server: tuple[str, ...] = ()  # extra s_server options
    resume: bool = False  # keep the second (resumed) connection of two
    note: str = ""


def _tls13(suite: str) -> tuple[str, ...]:
    return ("-tls1_3", "-ciphersuites", suite)


def _tls12(cipher: str, *extra: str) -> tuple[str, ...]:
    return ("-tls1_2", "-cipher", cipher, *extra)


CASES = (
    Case("tls13-aes128gcm", _tls13("TLS_AES_128_GCM_SHA256"), _tls13("TLS_AES_128_GCM_SHA256")),
    Case("tls13-aes256gcm", _tls13("TLS_AES_256_GCM_SHA384"), _tls13("TLS_AES_256_GCM_SHA384")),
    Case(
        "tls13-chacha20",
        _tls13("TLS_CHACHA20_POLY1305_SHA256"),
        _tls13("TLS_CHACHA20_POLY1305_SHA256"),
    ),
    Case("tls13-aes128ccm", _tls13("TLS_AES_128_CCM_SHA256"), _tls13("TLS_AES_128_CCM_SHA256")),
    Case(
        "tls13-aes128ccm8", _tls13("TLS_AES_128_CCM_8_SHA256"), _tls13("TLS_AES_128_CCM_8_SHA256")
    ),
    Case(
        "tls13-hrr",
        (*_tls13("TLS_AES_128_GCM_SHA256"), "-groups", "P-256:X25519"),
        (*_tls13("TLS_AES_128_GCM_SHA256"), "-groups", "X25519"),
        note="the client's key share (P-256) is not the server's group: HelloRetryRequest",
    ),
    Case(
        "tls13-resumed",
        _tls13("TLS_AES_256_GCM_SHA384"),
        _tls13("TLS_AES_256_GCM_SHA384"),
        resume=True,
        note="PSK resumption from the first connection's ticket: no Certificate",
    ),
    Case("tls12-aes128gcm", _tls12("ECDHE-RSA-AES128-GCM-SHA256"), _tls12("ALL")),
    Case("tls12-aes256gcm-sha384", _tls12("ECDHE-RSA-AES256-GCM-SHA384"), _tls12("ALL")),
    Case("tls12-chacha20", _tls12("ECDHE-RSA-CHACHA20-POLY1305"), _tls12("ALL")),
    Case("tls12-cbc-sha1-etm", _tls12("ECDHE-RSA-AES128-SHA"), _tls12("ALL")),
    Case("tls12-cbc-sha1-mte", _tls12("ECDHE-RSA-AES128-SHA", "-no_etm"), _tls12("ALL")),
    Case("tls12-cbc-sha256-mte", _tls12("ECDHE-RSA-AES128-SHA256", "-no_etm"), _tls12("ALL")),
    Case("tls12-cbc-sha384-etm", _tls12("ECDHE-RSA-AES256-SHA384"), _tls12("ALL")),
    Case(
        "tls12-resumed",
        _tls12("ECDHE-RSA-AES128-GCM-SHA256"),
        _tls12("ALL"),
        resume=True,
        note="abbreviated handshake from a session ticket: the server's CCS comes first",
    ),
)


@dataclass
class Capture:
    """Both directions of one relayed connection."""

    c2s: bytearray = field(default_factory=bytearray)
    s2c: bytearray = field(default_factory=bytearray)


class Relay:
    """Accepts on 127.0.0.1, connects each client to the server's port, copies and keeps bytes."""

    def __init__(self, upstream_port: int, connections: int) -> None:
        self.upstream_port = upstream_port
        self.connections = connections
        self.captures: list[Capture] = []
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(TIMEOUT)
        with self.listener:
            for _ in range(self.connections):
                client, _ = self.listener.accept()
                server = socket.create_connection((LOOPBACK, self.upstream_port), timeout=TIMEOUT)
                capture = Capture()
                self.captures.append(capture)
                self._pump(client, server, capture)

    @staticmethod
    def _pump(client: socket.socket, server: socket.socket, capture: Capture) -> None:
        peers = {client: (server, capture.c2s), server: (client, capture.s2c)}
        open_ = {client, server}
        deadline = time.monotonic() + TIMEOUT
        while open_ and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_), [], [], 0.5)
            for sock in ready:
                data = sock.recv(65536)
                other, sink = peers[sock]
                if not data:
                    open_.discard(sock)
                    with contextlib.suppress(OSError):
                        other.shutdown(socket.SHUT_WR)
                    continue
                sink += data
                other.sendall(data)
        client.close()
        server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def split_records(stream: bytes) -> list[list[int | str]]:
    """[content_type, version, fragment hex] for each whole record of a direction."""
    out: list[list[int | str]] = []
    p = 0
    while p + 5 <= len(stream):
        n = int.from_bytes(stream[p + 3 : p + 5], "big")
        if p + 5 + n > len(stream):
            break
        out.append(
            [
                stream[p],
                int.from_bytes(stream[p + 1 : p + 3], "big"),
                stream[p + 5 : p + 5 + n].hex(),
            ]
        )
        p += 5 + n
    if p != len(stream):
        raise RuntimeError(f"{len(stream) - p} trailing bytes that are no whole record")
    return out


def client_random(records: list[list[int | str]]) -> str:
    first = str(records[0][2])
    return first[2 * 6 : 2 * 38]  # handshake header (4) + legacy_version (2), then 32 bytes


def make_cert(workdir: Path) -> None:
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ],
        cwd=workdir,
        check=True,
        capture_output=True,
        timeout=60,
    )
    (workdir / "hello.txt").write_bytes(BODY)


def run_case(case: Case, workdir: Path) -> dict[str, Any]:
    port = free_port()
    connections = 2 if case.resume else 1
    server_log, client_log = workdir / f"{case.name}.server.keys", workdir / f"{case.name}.keys"
    server = subprocess.Popen(
        [
            "openssl",
            "s_server",
            "-accept",
            f"{LOOPBACK}:{port}",
            "-cert",
            "cert.pem",
            "-key",
            "key.pem",
            "-WWW",
            "-naccept",
            str(connections),
            "-keylogfile",
            str(server_log),
            *case.server,
        ],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        while b"ACCEPT" not in server.stdout.readline():
            if server.poll() is not None:
                raise RuntimeError(f"{case.name}: s_server exited: {server.stderr.read()!r}")
        relay = Relay(port, connections)
        session = workdir / f"{case.name}.session"
        for i in range(connections):
            resume = ("-sess_out", str(session)) if i == 0 else ("-sess_in", str(session))
            subprocess.run(
                [
                    "openssl",
                    "s_client",
                    "-connect",
                    f"{LOOPBACK}:{relay.port}",
                    "-servername",
                    "localhost",
                    "-quiet",
                    "-ign_eof",
                    "-keylogfile",
                    str(client_log),
                    *(resume if case.resume else ()),
                    *case.client,
                ],
                cwd=workdir,
                input=REQUEST,
                capture_output=True,
                timeout=TIMEOUT,
                check=True,
            )
        relay.thread.join(TIMEOUT)
        server.wait(TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    capture = relay.captures[-1]
    client_records, server_records = split_records(capture.c2s), split_records(capture.s2c)
    random = client_random(client_records)
    lines = [ln for ln in client_log.read_text().splitlines() if ln.split()[1:2] == [random]]
    server_lines = [ln for ln in server_log.read_text().splitlines() if random in ln]
    if not lines or sorted(lines) != sorted(server_lines):
        raise RuntimeError(f"{case.name}: client and server key logs disagree")
    return {
        "name": case.name,
        "note": case.note,
        "client_options": list(case.client),
        "lines": lines,
        "client_records": client_records,
        "server_records": server_records,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/support/tls_vectors.json"))
    args = parser.parse_args()
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="keytap-vectors-") as tmp:
        workdir = Path(tmp)
        make_cert(workdir)
        vectors = []
        for case in CASES:
            vector = run_case(case, workdir)
            vectors.append(vector)
            print(
                f"{case.name}: {len(vector['client_records'])} client, "
                f"{len(vector['server_records'])} server records, {len(vector['lines'])} lines"
            )
    doc = {
        "generator": "tools/gen_tls_vectors.py",
        "openssl": version.stdout.strip(),
        "format": "records are [content_type, record version, fragment hex], in send order",
        "vectors": vectors,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} ({len(vectors)} vectors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
