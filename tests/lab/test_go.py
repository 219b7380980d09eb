"""Go's crypto/tls: the lab's Go peer (tests/support/go_peer), built from source by Debian's Go
(1.19), a newer one (trixie's 1.24: X25519MLKEM768 by default) and an older one (bullseye's
1.15: arguments on the stack, keytap's other program), plain, stripped (-s -w), PIE and PIE
stripped, as server and as client in the pod.

tshark is the judge: every session decrypts from keytap's file alone (TLS 1.2 and 1.3, HTTP/1.1
and HTTP/2), and keytap's key log equals the one Go writes through KeyLogWriter in the pod. The
peer on the other side is a Go process outside the pod's namespace: its keys are never read
(the summary counts one handshake per session, not two). In the client role the pod's client
is started after keytap and handshakes at once (the launch gate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from tests.support import pcapng_blocks, tls_lab, tshark
from tests.support.go_builds import UNPACKED, VARIANTS, go_peer
from tests.support.tls_lab import read_keylog

PORT = 4443
SIZE = 3000
BODY = bytes(ord("a") + i % 26 for i in range(SIZE))
SESSIONS = (("1.2", False), ("1.2", True), ("1.3", False), ("1.3", True))  # (tls, http/2)
OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")
MLKEM_SINCE = (1, 24)  # the Go release whose TLS 1.3 key share is X25519MLKEM768 by default
X25519, X25519MLKEM768 = "29", "4588"
# A program built without go.mod gets Go 1.20's GODEBUG defaults, X25519MLKEM768 off: on again
# (Go 1.19 and 1.15 ignore the setting)
GODEBUG = ("env", "GODEBUG=tlsmlkem=1")


def layout(capture: Path, stream: int) -> tuple[list[int], list[list[str]]]:
    """Where the DSBs are (after how many packets) and the stream's frames with their TLS
    record types: what a failed decryption is read from."""
    dsbs, packets = [], 0
    for block in pcapng_blocks.walk(capture.read_bytes()):
        packets += block.type == pcapng_blocks.BT_EPB
        if block.type == pcapng_blocks.BT_DSB:
            dsbs.append(packets)
    frames = tshark.fields(capture, "frame.number", "tcp.srcport", "tcp.seq", "tcp.len",
                           "tls.record.content_type", display_filter=f"tcp.stream == {stream}",
                           extra=OUT_OF_ORDER)
    return dsbs, frames


def run_sessions(lab: Lab, keytap, tmp_path: Path, toolchain: str, variant: str,
                 pod_role: str) -> tuple[dict, Path]:
    """Four sessions, the pod's Go peer in `pod_role`; returns keytap's summary and capture."""
    peer = str(go_peer(toolchain, variant).path)
    cert, key = tls_lab.make_certificate(tmp_path)
    roles = tls_lab.PeerRoles.of(lab, tmp_path, pod_role)
    lab.spawn(roles.server_ns, *GODEBUG, peer, "-listen", f"{roles.server_ip}:{PORT}", "-cert",
              str(cert), "-key", str(key), "-keylog", str(roles.server_keys))
    lab.wait_for_port(roles.server_ns, PORT, roles.server_ip)
    capture, keys = tmp_path / "c.pcapng", tmp_path / "keys"
    summary = tmp_path / "summary.json"
    process = keytap("capture", "-i", lab.pod_veth, "-o", str(capture), "--keylog-file",
                     str(keys), "--summary-json", str(summary)).start()
    for version, http2 in SESSIONS:
        result = lab.run(roles.client_ns, *GODEBUG, peer, "-mode", "client", "-tls", version,
                         "-keylog", str(roles.client_keys), *([] if http2 else ["-http1"]),
                         f"https://{roles.server_ip}:{PORT}/bytes/{SIZE}")
        assert ("HTTP/2.0 200" if http2 else "HTTP/1.1 200") in result.stderr  # the premise
    assert process.stop() == 0, process.stderr
    own = read_keylog(roles.pod_keys)
    assert len(own) == 2 * 1 + 2 * 4  # the premise: CLIENT_RANDOM, or four TLS 1.3 secrets
    assert read_keylog(keys) == own, process.stderr
    assert read_keylog(roles.other_keys) == own  # both ends of a session log the same lines
    report = json.loads(summary.read_text())["tls"]
    # each session's body decrypted in a TCP stream of its own; matched by content, not by
    # stream index (a client that dials twice would shift the indices)
    ids = sorted({int(row[0]) for row in tshark.fields(capture, "tcp.stream") if row[0]})
    streams = tshark.follow_tls(capture, range(ids[-1] + 1), OUT_OF_ORDER)
    decrypted = [i for i, sides in enumerate(streams) if any(BODY in side for side in sides)]
    # on failure: the summary's TLS part, and where the DSBs sit among each stream's frames
    # that did not decrypt (not keytap's stderr, which CI's log cuts in the middle)
    assert len(decrypted) == len(SESSIONS), (decrypted, report, {
        i: ([len(side) for side in streams[i]], layout(capture, i))
        for i in ids if i not in decrypted})
    assert report["handshakes"] == len(SESSIONS), report  # the outside peer's keys: never read
    assert report["go_sessions_incomplete"] == 0, report
    role = "server" if pod_role == "server" else "client"
    assert report["verification"] == {
        f"TLS {version} {role}": {"verified": 2, "failed": 0, "unchecked": 0}
        for version in ("1.2", "1.3")}, report
    return report, capture


@pytest.mark.parametrize("pod_role", ["server", "client"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("toolchain", ["system", *UNPACKED])
def test_go_sessions_decrypt_from_the_file_alone(lab: Lab, keytap, tmp_path: Path,
                                                 toolchain: str, variant: str,
                                                 pod_role: str) -> None:
    _, capture = run_sessions(lab, keytap, tmp_path, toolchain, variant, pod_role)
    release = tuple(int(n) for n in go_peer(toolchain, variant).go_version[2:].split(".")[:2])
    expected = X25519MLKEM768 if release >= MLKEM_SINCE else X25519
    groups = tshark.fields(capture, "tls.handshake.extensions_key_share_group",
                           display_filter="tls.handshake.type == 2 and "
                           "tls.handshake.extensions_key_share_group", extra=OUT_OF_ORDER)
    assert [row[0] for row in groups] == [expected] * 2  # the TLS 1.3 ServerHellos


def test_both_ends_probed_are_both_verified(lab: Lab, keytap, tmp_path: Path) -> None:
    """Client and server both in scope (two pods of one node): each end's keys of a session
    are verified, the second by the secrets the first one's records verified."""
    peer = str(go_peer("system", "plain").path)
    cert, key = tls_lab.make_certificate(tmp_path)
    lab.spawn(lab.pod, *GODEBUG, peer, "-listen", f"{lab.pod_ip}:{PORT}", "-cert", str(cert),
              "-key", str(key))
    lab.wait_for_port(lab.pod, PORT, lab.pod_ip)
    capture, summary = tmp_path / "c.pcapng", tmp_path / "summary.json"
    process = keytap("capture", "-i", lab.pod_veth, "-i", lab.client_veth, "-o", str(capture),
                     "--summary-json", str(summary)).start()
    for version, http2 in SESSIONS:
        lab.run(lab.client, *GODEBUG, peer, "-mode", "client", "-tls", version,
                *([] if http2 else ["-http1"]), f"https://{lab.pod_ip}:{PORT}/bytes/{SIZE}")
    assert process.stop() == 0, process.stderr
    report = json.loads(summary.read_text())["tls"]
    assert report["handshakes"] == 2 * len(SESSIONS), report  # the premise: both ends probed
    assert report["verification"] == {
        f"TLS {version} {role}": {"verified": 2, "failed": 0, "unchecked": 0}
        for version in ("1.2", "1.3") for role in ("client", "server")}, report
    ids = sorted({int(row[0]) for row in tshark.fields(capture, "tcp.stream") if row[0]})
    streams = tshark.follow_tls(capture, range(ids[-1] + 1), OUT_OF_ORDER)
    assert sum(any(BODY in side for side in sides) for sides in streams) == len(SESSIONS)
