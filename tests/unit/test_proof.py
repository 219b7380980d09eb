"""proof: key-log lines proven (or refuted) by the records they must decrypt.

Vectors: RFC 8448 section 3 (tests/support/rfc8448.py), and real OpenSSL sessions for all five
TLS 1.3 suites and TLS 1.2 GCM/ChaCha20/CBC (tests/support/tls_vectors.json, written by
tools/gen_tls_vectors.py). For every vector: all lines verify; a flipped bit or a secret read
8 bytes off (its neighbour's bytes) fails; a prefix of the records is never FAILED.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keytap.tls import proof
from keytap.tls.proof import SessionProof, Verdict, prove
from keytap.tls.records import TlsRecord
from tests.support.rfc8448 import (
    RFC8448_CLIENT_RANDOM,
    RFC8448_CLIENT_RECORDS,
    RFC8448_SERVER_RECORDS,
    rfc8448_keylog,
)

VECTORS_FILE = Path(__file__).parents[1] / "support" / "tls_vectors.json"
EXPORTER = "EXPORTER_SECRET"


def parse_records(raw: Sequence[bytes]) -> list[TlsRecord]:
    out = []
    for r in raw:
        assert int.from_bytes(r[3:5], "big") == len(r) - 5
        out.append(TlsRecord(r[0], int.from_bytes(r[1:3], "big"), r[5:]))
    return out


@functools.cache
def vectors() -> dict[str, dict[str, Any]]:
    doc = json.loads(VECTORS_FILE.read_text())
    out = {}
    for v in doc["vectors"]:
        for side in ("client_records", "server_records"):
            v[side] = [TlsRecord(ct, ver, bytes.fromhex(frag)) for ct, ver, frag in v[side]]
        out[v["name"]] = v
    return out


RFC8448 = {
    "name": "rfc8448-section3",
    "client_records": parse_records(RFC8448_CLIENT_RECORDS),
    "server_records": parse_records(RFC8448_SERVER_RECORDS),
    "lines": rfc8448_keylog(),
}


def all_vectors() -> list[dict[str, Any]]:
    return [RFC8448, *vectors().values()]


def vector_ids() -> list[str]:
    return ["rfc8448-section3", *vectors()]


def vector(name: str) -> dict[str, Any]:
    return RFC8448 if name == RFC8448["name"] else vectors()[name]


def run(
    v: dict[str, Any],
    lines: Sequence[str] | None = None,
    client: int | None = None,
    server: int | None = None,
) -> SessionProof:
    return prove(
        v["client_records"][:client],
        v["server_records"][:server],
        v["lines"] if lines is None else lines,
    )


def checkable(lines: Sequence[str]) -> list[str]:
    return [ln.split()[0] for ln in lines if ln.split()[0] != EXPORTER]


def replace_secret(lines: Sequence[str], label: str, secret: bytes) -> list[str]:
    out = []
    for ln in lines:
        name, random_hex, _ = ln.split()
        out.append(f"{name} {random_hex} {secret.hex()}" if name == label else ln)
    return out


def secret_of(lines: Sequence[str], label: str) -> bytes:
    return next(bytes.fromhex(ln.split()[2]) for ln in lines if ln.split()[0] == label)


NAMES = vector_ids()


# --- every vector -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_all_lines_verify(name: str) -> None:
    v = vector(name)
    p = run(v)
    labels = checkable(v["lines"])
    assert labels
    assert {label: p.secrets[label] for label in labels} == dict.fromkeys(labels, Verdict.VERIFIED)
    assert p.ok and p.settled and not p.ignored
    if EXPORTER in p.secrets:
        assert p.secrets[EXPORTER] is Verdict.UNCHECKED and EXPORTER not in p.pending
    assert p.version == (0x0304 if name.startswith(("tls13", "rfc8448")) else 0x0303)


@pytest.mark.parametrize("name", NAMES)
def test_one_flipped_bit_fails_only_that_line(name: str) -> None:
    v = vector(name)
    for label in checkable(v["lines"]):
        secret = bytearray(secret_of(v["lines"], label))
        secret[len(secret) // 2] ^= 0x10
        p = run(v, replace_secret(v["lines"], label, bytes(secret)))
        assert p.secrets[label] is Verdict.FAILED, (label, p.details[label])
        # The other keys are still found, even where the walk to them used the broken one.
        others = [other for other in checkable(v["lines"]) if other != label]
        assert all(p.secrets[o] is Verdict.VERIFIED for o in others), (label, p.details)


@pytest.mark.parametrize("name", NAMES)
def test_secret_read_8_bytes_off_fails(name: str) -> None:
    """A wrong offset: the secret's array read 8 bytes late (the rest of OpenSSL's 64-byte
    EVP_MAX_MD_SIZE array is zero, SSL_SESSION's master_key is followed by its length) or 8
    bytes early (the tail of the field before it)."""
    v = vector(name)
    labels = checkable(v["lines"])
    for i, label in enumerate(labels):
        secret = secret_of(v["lines"], label)
        before = secret_of(v["lines"], labels[i - 1]) if len(labels) > 1 else RFC8448_CLIENT_RANDOM
        for shifted in (secret[8:] + bytes(8), before[-8:] + secret[:-8]):
            p = run(v, replace_secret(v["lines"], label, shifted))
            assert p.secrets[label] is Verdict.FAILED, (label, p.details[label])


@pytest.mark.parametrize("name", NAMES)
def test_prefixes_are_unchecked_never_failed(name: str) -> None:
    v = vector(name)
    n_client, n_server = len(v["client_records"]), len(v["server_records"])
    cuts = [(c, n_server) for c in range(n_client)] + [(n_client, s) for s in range(n_server)]
    cuts += [(c, c) for c in range(min(n_client, n_server))]
    for client, server in cuts:
        p = run(v, client=client, server=server)
        assert not p.failed, (client, server, p.details)
        # Whatever is still open can be settled by the records that are missing.
        assert set(p.unchecked) - {EXPORTER} <= p.pending, (client, server, p.details)
        assert not p.ignored


@pytest.mark.parametrize("name", NAMES)
def test_a_memo_gives_what_a_fresh_proof_gives_and_redoes_nothing_settled(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reorder buffer proves a session again as its records come, with one ProofMemo."""
    v = vector(name)
    memo = proof.ProofMemo()
    n_client, n_server = len(v["client_records"]), len(v["server_records"])
    steps = sorted({(min(i, n_client), min(i, n_server)) for i in range(max(n_client, n_server))})
    for client, server in [*steps, (n_client, n_server)]:
        fresh = run(v, client=client, server=server)
        again = prove(v["client_records"][:client], v["server_records"][:server], v["lines"],
                      memo)
        assert again == fresh, (client, server)
    decrypts = []
    monkeypatch.setattr(proof._Keys13, "decrypt", lambda *a: decrypts.append(a))
    monkeypatch.setattr(proof, "_decrypt12", lambda *a: decrypts.append(a))
    settled = prove(v["client_records"], v["server_records"], v["lines"], memo)
    assert settled.settled and not decrypts  # every check and walk was kept


AT_ONCE = [name for name in NAMES  # the common shape: no HRR, each Finished alone in a record
           if name.startswith("tls13") and name != "tls13-hrr"]


@pytest.mark.parametrize("name", AT_ONCE)
def test_the_common_tls13_session_is_proven_at_once_as_the_full_walk_proves_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = vector(name)
    walked = proof._prove(v["client_records"], v["server_records"], v["lines"],
                          proof.ProofMemo())
    monkeypatch.setattr(proof, "_prove", lambda *a: pytest.fail("not proven at once"))
    assert run(v) == walked  # the same verdicts, details and hellos


@pytest.mark.parametrize("name", AT_ONCE)
def test_proof_at_once_says_what_the_full_walk_says_or_nothing(name: str) -> None:
    """On every prefix of the records, with each secret right or wrong: no verdict at once,
    or the one `_prove` gives. A refuted secret is always left to `_prove`."""
    v = vector(name)
    client, server, lines = v["client_records"], v["server_records"], v["lines"]
    variants = [lines]
    for label in checkable(lines):
        secret = bytearray(secret_of(lines, label))
        secret[0] ^= 1
        variants.append(replace_secret(lines, label, bytes(secret)))
    variants.append([line.replace(line.split()[1], "00" * 32) for line in lines])
    variants.append([line for line in lines if not line.startswith("CLIENT_TRAFFIC_SECRET_0 ")])
    answered = 0
    for some in variants:
        for n_client in range(len(client) + 1):
            for n_server in range(len(server) + 1):
                at_once = proof._tls13_at_once(client[:n_client], server[:n_server], some)
                if at_once is None:
                    continue
                answered += 1
                assert at_once.ok, (n_client, n_server)
                assert at_once == proof._prove(client[:n_client], server[:n_server], some,
                                               proof.ProofMemo()), (n_client, n_server)
    assert answered >= 2  # the whole session, and the client's traffic record not yet there


@pytest.mark.parametrize("name", NAMES)
def test_fragments_cut_short_never_raise_nor_fail_in_handshake(name: str) -> None:
    """Records cut short (a snapped capture): whatever the verdict, no exception, and the
    records before the cut still prove what they protect."""
    v = vector(name)
    rng = random.Random(name)
    for side in ("client_records", "server_records"):
        records = v[side]
        for i, r in enumerate(records):
            cut = TlsRecord(r.content_type, r.version, r.fragment[: rng.randrange(len(r.fragment))])
            broken = dict(v, **{side: [*records[:i], cut, *records[i + 1 :]]})
            p = run(broken)
            assert not any(d.startswith("internal error") for d in p.details.values())


# --- RFC 8448 -----------------------------------------------------------------------------------


def test_rfc8448_details() -> None:
    p = run(RFC8448)
    assert p.cipher_suite == 0x1301
    assert p.client_random == RFC8448_CLIENT_RANDOM
    assert p.verified == (
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        "SERVER_HANDSHAKE_TRAFFIC_SECRET",
        "CLIENT_TRAFFIC_SECRET_0",
        "SERVER_TRAFFIC_SECRET_0",
    )
    assert p.unchecked == (EXPORTER,) and p.failed == ()
    # The NewSessionTicket is the first record under the server's application key.
    assert p.details["SERVER_TRAFFIC_SECRET_0"] == "the server's first application record decrypts"


def test_rfc8448_records_in_flight() -> None:
    p = run(RFC8448, client=1, server=2)  # ClientHello; ServerHello and the server's flight
    assert p.secrets["SERVER_HANDSHAKE_TRAFFIC_SECRET"] is Verdict.VERIFIED
    assert p.pending == {
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        "CLIENT_TRAFFIC_SECRET_0",
        "SERVER_TRAFFIC_SECRET_0",
    }
    assert not p.settled and p.ok


def test_lines_of_another_session_are_ignored() -> None:
    other = [ln.replace(RFC8448_CLIENT_RANDOM.hex(), "11" * 32) for ln in RFC8448["lines"]]
    junk = ["", "# a comment", "CLIENT_RANDOM zz 00", "not a key-log line", "A " + "00" * 32]
    p = run(RFC8448, [RFC8448["lines"][1], *other, *junk])
    assert p.secrets == {"SERVER_HANDSHAKE_TRAFFIC_SECRET": Verdict.VERIFIED}
    assert p.ignored == (*other, *junk[2:])


def test_no_client_hello_or_no_server_hello() -> None:
    p = run(RFC8448, client=0, server=0)
    assert set(p.pending) == set(checkable(RFC8448["lines"]))
    p = run(RFC8448, server=0)
    assert p.unchecked == tuple(p.secrets) and p.version is None


def test_duplicate_label_with_a_wrong_secret_fails() -> None:
    lines = RFC8448["lines"]
    wrong = replace_secret(lines, "SERVER_TRAFFIC_SECRET_0", bytes(32))
    p = run(RFC8448, [*lines, *wrong])
    assert p.secrets["SERVER_TRAFFIC_SECRET_0"] is Verdict.FAILED
    assert p.secrets["CLIENT_TRAFFIC_SECRET_0"] is Verdict.VERIFIED


# --- TLS 1.3 specifics --------------------------------------------------------------------------


def with_early_data_offer(ch_record: TlsRecord) -> TlsRecord:
    """The ClientHello with an early_data extension (empty, type 42) appended."""
    body = bytearray(ch_record.fragment[4:])
    p = 35 + body[34]
    p += 2 + int.from_bytes(body[p : p + 2], "big")
    p += 1 + body[p]
    ext_len = int.from_bytes(body[p : p + 2], "big")
    body[p : p + 2] = (ext_len + 4).to_bytes(2, "big")
    body += b"\x00\x2a\x00\x00"
    return TlsRecord(
        ch_record.content_type,
        ch_record.version,
        b"\x01" + len(body).to_bytes(3, "big") + bytes(body),
    )


def test_early_data_before_the_client_finished() -> None:
    """0-RTT records may precede the client's handshake records: try them, never FAIL."""
    v = vectors()["tls13-aes128gcm"]
    ch, ccs, *rest = v["client_records"]
    early = TlsRecord(23, 0x0303, bytes(range(40)))  # not under the handshake key
    offered = dict(v, client_records=[with_early_data_offer(ch), ccs, early, *rest])
    p = run(offered)
    assert p.secrets["CLIENT_HANDSHAKE_TRAFFIC_SECRET"] is Verdict.VERIFIED
    assert p.secrets["CLIENT_TRAFFIC_SECRET_0"] is Verdict.VERIFIED
    wrong = replace_secret(v["lines"], "CLIENT_HANDSHAKE_TRAFFIC_SECRET", bytes(32))
    p = run(offered, wrong)
    assert p.secrets["CLIENT_HANDSHAKE_TRAFFIC_SECRET"] is Verdict.UNCHECKED
    # Without the offer the first encrypted record must be the handshake key's: FAILED.
    p = run(dict(v, client_records=[ch, ccs, early, *rest]))
    assert p.secrets["CLIENT_HANDSHAKE_TRAFFIC_SECRET"] is Verdict.FAILED


def test_hrr_waits_for_the_second_client_hello() -> None:
    v = vectors()["tls13-hrr"]
    p = run(v, client=2)  # ClientHello 1, CCS
    assert p.secrets["SERVER_HANDSHAKE_TRAFFIC_SECRET"] is Verdict.VERIFIED
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in p.pending


def test_application_key_found_without_the_handshake_line() -> None:
    """No handshake line, so no walk to the Finished: each later record is tried instead."""
    v = vectors()["tls13-chacha20"]
    p = run(v, [ln for ln in v["lines"] if "HANDSHAKE" not in ln])
    assert set(p.verified) == {"SERVER_TRAFFIC_SECRET_0", "CLIENT_TRAFFIC_SECRET_0"}
    assert p.settled


def test_unknown_tls13_suite_is_unchecked() -> None:
    v = vectors()["tls13-aes128gcm"]
    sh = v["server_records"][0]
    frag = bytearray(sh.fragment)
    p = 4 + 35 + frag[4 + 34]
    assert frag[p : p + 2] == b"\x13\x01"
    frag[p : p + 2] = b"\xc0\xb4"  # TLS_SHA256_SHA256 (RFC 9150), not checked
    changed = dict(
        v, server_records=[TlsRecord(22, sh.version, bytes(frag)), *v["server_records"][1:]]
    )
    result = run(changed)
    assert result.unchecked == tuple(result.secrets) and result.settled


# --- TLS 1.2 specifics --------------------------------------------------------------------------


def server_hello_with(
    v: dict[str, Any], *, version: int | None = None, suite: int | None = None
) -> dict[str, Any]:
    sh = v["server_records"][0]
    frag = bytearray(sh.fragment)
    if version is not None:
        frag[4:6] = version.to_bytes(2, "big")
    if suite is not None:
        p = 4 + 35 + frag[4 + 34]
        frag[p : p + 2] = suite.to_bytes(2, "big")
    return dict(
        v, server_records=[TlsRecord(22, sh.version, bytes(frag)), *v["server_records"][1:]]
    )


@pytest.mark.parametrize(
    ("version", "suite"),
    [(0x0302, None), (0x0301, None), (None, 0xC09C), (None, 0x000A), (None, 0x003B)],
    ids=["tls1.1", "tls1.0", "ccm", "3des", "null"],
)
def test_tls12_not_checked(version: int | None, suite: int | None) -> None:
    p = run(server_hello_with(vectors()["tls12-aes128gcm"], version=version, suite=suite))
    assert p.secrets == {"CLIENT_RANDOM": Verdict.UNCHECKED} and p.settled


def test_tls12_one_side_is_enough_and_a_failure_wins() -> None:
    v = vectors()["tls12-cbc-sha1-mte"]
    client_ccs = next(i for i, r in enumerate(v["client_records"]) if r.content_type == 20)
    p = run(v, client=client_ccs + 1)  # the client's Finished not seen
    assert p.secrets["CLIENT_RANDOM"] is Verdict.VERIFIED
    # The client's Finished with one ciphertext bit flipped: that side fails, so the line does.
    fin = v["client_records"][client_ccs + 1]
    bad = TlsRecord(
        fin.content_type,
        fin.version,
        fin.fragment[:20] + bytes((fin.fragment[20] ^ 1,)) + fin.fragment[21:],
    )
    records = list(v["client_records"])
    records[client_ccs + 1] = bad
    p = run(dict(v, client_records=records))
    assert p.secrets["CLIENT_RANDOM"] is Verdict.FAILED


def test_tls12_record_that_verifies_but_is_no_finished() -> None:
    """A record after the CCS that authenticates but holds no Finished: FAILED."""
    v = vectors()["tls12-aes128gcm"]
    master = secret_of(v["lines"], "CLIENT_RANDOM")
    hello = proof._server_start(v["server_records"])
    assert isinstance(hello, proof._ServerStart)
    suite = proof._SUITES12[hello.hello.cipher_suite]
    client_keys, _ = proof._key_block(
        suite, master, bytes.fromhex(v["lines"][0].split()[1]), hello.hello.random
    )
    plain = b"\x15\x00\x00\x0c" + bytes(12)  # a "handshake message" of type 21
    explicit = bytes(8)
    aad = bytes(8) + b"\x16\x03\x03" + len(plain).to_bytes(2, "big")
    fragment = explicit + AESGCM(client_keys.key).encrypt(client_keys.iv + explicit, plain, aad)
    records = list(v["client_records"])
    ccs = next(i for i, r in enumerate(records) if r.content_type == 20)
    records[ccs + 1] = TlsRecord(22, 0x0303, fragment)
    p = run(dict(v, client_records=records))
    assert p.secrets["CLIENT_RANDOM"] is Verdict.FAILED
    assert "no Finished" in p.details["CLIENT_RANDOM"]


def test_tls13_lines_on_a_tls12_session_are_unchecked() -> None:
    v12, v13 = vectors()["tls12-chacha20"], vectors()["tls13-chacha20"]
    random_hex = v12["lines"][0].split()[1]
    lines = [ln.replace(ln.split()[1], random_hex) for ln in v13["lines"]]
    p = run(v12, [*v12["lines"], *lines])
    assert p.secrets["CLIENT_RANDOM"] is Verdict.VERIFIED
    assert all(p.secrets[ln.split()[0]] is Verdict.UNCHECKED for ln in lines)
    assert p.settled


# --- garbage ------------------------------------------------------------------------------------


def test_garbage_never_raises() -> None:
    rng = random.Random(8448)
    sources = [
        vector(n)
        for n in (
            "rfc8448-section3",
            "tls13-aes128ccm8",
            "tls12-cbc-sha1-etm",
            "tls12-chacha20",
            "tls13-hrr",
        )
    ]
    for _ in range(200):
        v = rng.choice(sources)
        sides = {
            "client_records": list(v["client_records"]),
            "server_records": list(v["server_records"]),
        }
        for _ in range(rng.randint(1, 3)):
            records = sides[rng.choice(list(sides))]
            if not records:
                continue
            i = rng.randrange(len(records))
            r = records[i]
            frag = bytearray(r.fragment)
            op = rng.randrange(5)
            if op == 0 and frag:
                frag[rng.randrange(len(frag))] ^= 1 << rng.randrange(8)
            elif op == 1:
                del frag[rng.randrange(len(frag) + 1) :]
            elif op == 2:
                frag += rng.randbytes(rng.randrange(40))
            elif op == 3:
                del records[i]
                continue
            ct = rng.choice((r.content_type, 20, 21, 22, 23, 0, 255))
            records[i] = TlsRecord(ct, rng.choice((r.version, 0x0303, 0, 0xFFFF)), bytes(frag))
        p = prove(sides["client_records"], sides["server_records"], v["lines"])
        assert not any(d.startswith("internal error") for d in p.details.values()), p.details
    assert prove([], [], []).secrets == {}
    random_frag = TlsRecord(22, 0x0301, rng.randbytes(300))
    prove([random_frag] * 3, [random_frag] * 3, RFC8448["lines"])
