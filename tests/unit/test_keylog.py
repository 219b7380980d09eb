"""keylog: HKDF-Expand-Label and key-log lines against published TLS 1.3 traces.

SHA-256 vectors: RFC 8448 section 3 (Simple 1-RTT Handshake, TLS_AES_128_GCM_SHA256).
SHA-384 vectors: "The Illustrated TLS 1.3 Connection" (https://tls13.xargs.org, server handshake
keys calculation), which negotiates TLS_AES_256_GCM_SHA384.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from keytap.tls.keylog import (
    KeyedHmac,
    Tls12Secrets,
    Tls13Secrets,
    digest_for_cipher,
    hkdf_expand_label,
    hkdf_expand_labels,
    keylog_lines,
)
from tests.support.rfc8448 import (
    RFC8448_CLIENT_HELLO,
    RFC8448_CLIENT_RANDOM,
    RFC8448_SERVER_HELLO,
    h,
)

# RFC 8448 section 3 -------------------------------------------------------------------------

RFC8448_EARLY_SECRET = h("""
    33 ad 0a 1c 60 7e c0 3b 09 e6 cd 98 93 68 0c e2
    10 ad f3 00 aa 1f 26 60 e1 b2 2e 10 f1 70 f9 2a""")
RFC8448_DERIVED = h("""
    6f 26 15 a1 08 c7 02 c5 67 8f 54 fc 9d ba b6 97
    16 c0 76 18 9c 48 25 0c eb ea c3 57 6c 36 11 ba""")
RFC8448_HANDSHAKE_SECRET = h("""
    1d c8 26 e9 36 06 aa 6f dc 0a ad c1 2f 74 1b 01
    04 6a a6 b9 9f 69 1e d2 21 a9 f0 ca 04 3f be ac""")
RFC8448_HELLO_HASH = h("""
    86 0c 06 ed c0 78 58 ee 8e 78 f0 e7 42 8c 58 ed
    d6 b4 3f 2c a3 e6 e9 5f 02 ed 06 3c f0 e1 ca d8""")
RFC8448_C_HS_TRAFFIC = h("""
    b3 ed db 12 6e 06 7f 35 a7 80 b3 ab f4 5e 2d 8f
    3b 1a 95 07 38 f5 2e 96 00 74 6a 0e 27 a5 5a 21""")
RFC8448_S_HS_TRAFFIC = h("""
    b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4
    e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38""")
RFC8448_S_HS_KEY = h("3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc")
RFC8448_S_HS_IV = h("5d 31 3e b2 67 12 76 ee 13 00 0b 30")

# tls13.xargs.org (TLS_AES_256_GCM_SHA384) -----------------------------------------------------
XARGS_HELLO_HASH = h(
    "e05f64fcd082bdb0dce473adf669c2769f257a1c75a51b7887468b5e0e7a7de4"
    "f4d34555112077f16e079019d5a845bd"
)
XARGS_HANDSHAKE_SECRET = h(
    "bdbbe8757494bef20de932598294ea65b5e6bf6dc5c02a960a2de2eaa9b07c92"
    "9078d2caa0936231c38d1725f179d299"
)
XARGS_C_HS_TRAFFIC = h(
    "db89d2d6df0e84fed74a2288f8fd4d0959f790ff23946cdf4c26d85e51bebd42"
    "ae184501972f8d30c4a3e4a3693d0ef0"
)
XARGS_S_HS_TRAFFIC = h(
    "23323da031634b241dd37d61032b62a4f450584d1f7f47983ba2f7cc0cdcc39a"
    "68f481f2b019f9403a3051908a5d1622"
)


def pad64(secret: bytes, filler: int = 0xEE) -> bytes:
    """As OpenSSL stores it: an EVP_MAX_MD_SIZE array; the tail must be ignored."""
    return secret + bytes([filler]) * (64 - len(secret))


def test_rfc8448_transcript_hash_is_hash_of_hellos() -> None:
    # Ties the vectors together: the "hash" input the RFC lists for "c hs traffic" really is
    # SHA-256(ClientHello || ServerHello) of the same trace.
    assert hashlib.sha256(RFC8448_CLIENT_HELLO + RFC8448_SERVER_HELLO).digest() == (
        RFC8448_HELLO_HASH
    )
    assert RFC8448_CLIENT_HELLO[6:38] == RFC8448_CLIENT_RANDOM


@pytest.mark.parametrize(
    ("handshake_secret", "hello_hash", "algorithm", "client", "server"),
    [
        (RFC8448_HANDSHAKE_SECRET, RFC8448_HELLO_HASH, hashes.SHA256(), RFC8448_C_HS_TRAFFIC,
         RFC8448_S_HS_TRAFFIC),
        (XARGS_HANDSHAKE_SECRET, XARGS_HELLO_HASH, hashes.SHA384(), XARGS_C_HS_TRAFFIC,
         XARGS_S_HS_TRAFFIC),
    ],
    ids=["rfc8448-sha256", "published-sha384"],
)
def test_hkdf_expand_label_handshake_traffic_secrets(
    handshake_secret: bytes, hello_hash: bytes, algorithm: hashes.HashAlgorithm, client: bytes,
    server: bytes,
) -> None:
    size = algorithm.digest_size
    c = hkdf_expand_label(handshake_secret, "c hs traffic", hello_hash, size, algorithm)
    s = hkdf_expand_label(handshake_secret, "s hs traffic", hello_hash, size, algorithm)
    assert c == client
    assert s == server


def test_hkdf_expand_label_rfc8448_other_shapes() -> None:
    sha256 = hashes.SHA256()
    # Derive-Secret(early, "derived", "") uses the hash of the empty string as context.
    empty_hash = hashlib.sha256(b"").digest()
    assert hkdf_expand_label(RFC8448_EARLY_SECRET, "derived", empty_hash, 32, sha256) == (
        RFC8448_DERIVED
    )
    # Empty context and lengths other than the hash size (traffic key and iv).
    assert hkdf_expand_label(RFC8448_S_HS_TRAFFIC, "key", b"", 16, sha256) == RFC8448_S_HS_KEY
    assert hkdf_expand_label(RFC8448_S_HS_TRAFFIC, "iv", b"", 12, sha256) == RFC8448_S_HS_IV


def test_hkdf_expand_label_rejects_oversized_inputs() -> None:
    with pytest.raises(ValueError):
        hkdf_expand_label(b"k" * 32, "x" * 250, b"", 32, hashes.SHA256())
    with pytest.raises(ValueError):
        hkdf_expand_label(b"k" * 32, "c hs traffic", b"c" * 256, 32, hashes.SHA256())


@pytest.mark.parametrize(
    ("cipher_id", "name"),
    [
        (0x03001301, "sha256"),
        (0x03001302, "sha384"),
        (0x03001303, "sha256"),
        (0x03001304, "sha256"),
        (0x03001305, "sha256"),
        (0x0300C0B4, "sha256"),
        (0x0300C0B5, "sha384"),
        (0x1302, "sha384"),  # the bare IANA value is accepted too
    ],
)
def test_digest_for_cipher(cipher_id: int, name: str) -> None:
    assert digest_for_cipher(cipher_id).name == name


@pytest.mark.parametrize("cipher_id", [0, 0x0300C02F, 0x03001306, 0x02001301, 0x0300FFFF])
def test_digest_for_cipher_unknown(cipher_id: int) -> None:
    # 0x0300C02F is ECDHE-RSA-AES128-GCM-SHA256: a TLS 1.2 suite has no TLS 1.3 key schedule.
    with pytest.raises(ValueError):
        digest_for_cipher(cipher_id)


def test_keylog_lines_tls12() -> None:
    master = bytes(range(48))
    lines = keylog_lines(Tls12Secrets(client_random=RFC8448_CLIENT_RANDOM, master_key=master))
    assert lines == (f"CLIENT_RANDOM {RFC8448_CLIENT_RANDOM.hex()} {master.hex()}",)


def test_keylog_lines_tls12_rejects_bad_lengths_and_skips_unset() -> None:
    with pytest.raises(ValueError):
        keylog_lines(Tls12Secrets(client_random=b"\x01" * 31, master_key=b"\x02" * 48))
    with pytest.raises(ValueError):
        keylog_lines(Tls12Secrets(client_random=b"\x01" * 32, master_key=b"\x02" * 64))
    assert keylog_lines(Tls12Secrets(client_random=b"\x01" * 32, master_key=bytes(48))) == ()


def tls13(cipher_id: int, hs_secret: bytes, hs_hash: bytes, **over: bytes) -> Tls13Secrets:
    fields = {
        "client_app_traffic_secret": pad64(b"\xca" * len(hs_secret)),
        "server_app_traffic_secret": pad64(b"\x5a" * len(hs_secret)),
        "exporter_master_secret": pad64(b"\xe7" * len(hs_secret)),
    }
    fields.update(over)
    return Tls13Secrets(
        client_random=RFC8448_CLIENT_RANDOM,
        cipher_id=cipher_id,
        handshake_secret=pad64(hs_secret),
        handshake_traffic_hash=pad64(hs_hash),
        **fields,
    )


def test_keylog_lines_tls13_sha256_from_raw_openssl_arrays() -> None:
    lines = keylog_lines(tls13(0x03001301, RFC8448_HANDSHAKE_SECRET, RFC8448_HELLO_HASH))
    r = RFC8448_CLIENT_RANDOM.hex()
    assert lines == (
        f"CLIENT_HANDSHAKE_TRAFFIC_SECRET {r} {RFC8448_C_HS_TRAFFIC.hex()}",
        f"SERVER_HANDSHAKE_TRAFFIC_SECRET {r} {RFC8448_S_HS_TRAFFIC.hex()}",
        f"CLIENT_TRAFFIC_SECRET_0 {r} {'ca' * 32}",
        f"SERVER_TRAFFIC_SECRET_0 {r} {'5a' * 32}",
        f"EXPORTER_SECRET {r} {'e7' * 32}",
    )


def test_keylog_lines_tls13_sha384_uses_48_bytes() -> None:
    lines = keylog_lines(tls13(0x03001302, XARGS_HANDSHAKE_SECRET, XARGS_HELLO_HASH))
    r = RFC8448_CLIENT_RANDOM.hex()
    assert lines[0] == f"CLIENT_HANDSHAKE_TRAFFIC_SECRET {r} {XARGS_C_HS_TRAFFIC.hex()}"
    assert lines[1] == f"SERVER_HANDSHAKE_TRAFFIC_SECRET {r} {XARGS_S_HS_TRAFFIC.hex()}"
    assert lines[2] == f"CLIENT_TRAFFIC_SECRET_0 {r} {'ca' * 48}"
    assert all(len(line.split()[2]) == 96 for line in lines)


def test_keylog_lines_tls13_suite_hash_matters() -> None:
    # The same raw arrays read under a SHA-384 suite give different (longer) secrets.
    raw = dict(hs_secret=RFC8448_HANDSHAKE_SECRET + b"\x11" * 16, hs_hash=b"\x22" * 48)
    a = keylog_lines(tls13(0x03001301, **raw))
    b = keylog_lines(tls13(0x03001302, **raw))
    assert len(a[0].split()[2]) == 64 and len(b[0].split()[2]) == 96
    assert not b[0].split()[2].startswith(a[0].split()[2])


def test_keylog_lines_tls13_skips_unset_secrets() -> None:
    s = tls13(
        0x03001301,
        RFC8448_HANDSHAKE_SECRET,
        RFC8448_HELLO_HASH,
        exporter_master_secret=bytes(64),
    )
    labels = [line.split()[0] for line in keylog_lines(s)]
    assert labels == [
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        "SERVER_HANDSHAKE_TRAFFIC_SECRET",
        "CLIENT_TRAFFIC_SECRET_0",
        "SERVER_TRAFFIC_SECRET_0",
    ]
    # Before ServerHello nothing is set: nothing to log.
    empty = Tls13Secrets(RFC8448_CLIENT_RANDOM, 0x03001301, *([bytes(64)] * 5))
    assert keylog_lines(empty) == ()


def test_keylog_lines_tls13_rejects_short_arrays_and_unknown_cipher() -> None:
    with pytest.raises(ValueError):
        keylog_lines(
            tls13(
                0x03001302,
                RFC8448_HANDSHAKE_SECRET,
                RFC8448_HELLO_HASH,
                client_app_traffic_secret=b"\x01" * 32,
            )
        )
    with pytest.raises(ValueError):
        keylog_lines(tls13(0x0300C02F, RFC8448_HANDSHAKE_SECRET, RFC8448_HELLO_HASH))


@pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384()])
@pytest.mark.parametrize("length", [12, 16, 32, 48, 80])
def test_hkdf_expand_label_is_hkdf_expand_of_the_hkdf_label(
        algorithm: hashes.HashAlgorithm, length: int) -> None:
    """The one-HMAC path (a label no longer than the hash) and the library's agree."""
    secret, context = bytes(range(algorithm.digest_size)), b"transcript hash"
    label = b"tls13 key"
    info = (struct.pack("!HB", length, len(label)) + label + bytes((len(context),)) + context)
    expected = HKDFExpand(algorithm=algorithm, length=length, info=info).derive(secret)
    assert hkdf_expand_label(secret, "key", context, length, algorithm) == expected


@pytest.mark.parametrize("digest", ["sha1", "sha256", "sha384"])
@pytest.mark.parametrize("key_len", [0, 20, 48, 64, 128, 129, 200])
def test_keyed_hmac_is_hmac(digest: str, key_len: int) -> None:
    """Keys shorter than, as long as and longer than the hash's block; several messages."""
    key = bytes(i % 251 for i in range(key_len))
    mac = KeyedHmac(key, digest)
    for message in (b"", b"one", bytes(range(256)) * 3):
        assert mac(message) == hmac.digest(key, message, digest)
    assert mac.digest_size == hashlib.new(digest).digest_size


def test_hkdf_expand_labels_is_each_label_expanded_alone() -> None:
    """One key's HMAC serves every label of a secret: each comes out as HKDF-Expand makes it."""
    algorithm = hashes.SHA384()
    secret = bytes(range(48))
    labels = (("key", b"", 32), ("iv", b"", 12), ("finished", b"ctx", 48), ("long", b"", 80))
    expected = []
    for label, context, length in labels:
        full = b"tls13 " + label.encode()
        info = struct.pack("!HB", length, len(full)) + full + bytes((len(context),)) + context
        expected.append(HKDFExpand(algorithm=algorithm, length=length, info=info).derive(secret))
    assert hkdf_expand_labels(secret, labels, algorithm) == expected
