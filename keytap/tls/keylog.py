"""Turn secrets read out of OpenSSL's structs into NSS key-log lines (SSLKEYLOGFILE format).

The uprobes copy raw fields (`client_random`, `master_key`, the TLS 1.3 secrets, the negotiated
cipher id) without interpreting them; this module does the interpreting in user space, where a
bug costs a unit test rather than a verifier rejection.

TLS 1.3 needs one derivation: OpenSSL keeps `handshake_secret` and `handshake_traffic_hash`
(the transcript hash of ClientHello..ServerHello) but not the client/server *handshake traffic*
secrets themselves, so they are re-derived here with HKDF-Expand-Label (RFC 8446 section 7.1).
The application traffic secrets and the exporter secret are kept by OpenSSL as-is.

OpenSSL stores every TLS 1.3 secret in an `EVP_MAX_MD_SIZE` (64-byte) array; only the first
`digest_size` bytes of the suite's hash are meaningful.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

CLIENT_RANDOM_LEN = 32
TLS12_MASTER_SECRET_LEN = 48  # RFC 5246 section 8.1: always 48 bytes

# OpenSSL's SSL_CIPHER.id for TLS 1.3 suites is 0x03000000 | IANA value (TLS1_3_CK_* in tls1.h).
_OPENSSL_ID_BASE = 0x03000000
# IANA TLS 1.3 suite -> hash used by its key schedule (RFC 8446 B.4, RFC 9150).
_SUITE_HASH: dict[int, type[hashes.HashAlgorithm]] = {
    0x1301: hashes.SHA256,  # TLS_AES_128_GCM_SHA256
    0x1302: hashes.SHA384,  # TLS_AES_256_GCM_SHA384
    0x1303: hashes.SHA256,  # TLS_CHACHA20_POLY1305_SHA256
    0x1304: hashes.SHA256,  # TLS_AES_128_CCM_SHA256
    0x1305: hashes.SHA256,  # TLS_AES_128_CCM_8_SHA256
    0xC0B4: hashes.SHA256,  # TLS_SHA256_SHA256 (integrity only, RFC 9150; OpenSSL >= 3.4)
    0xC0B5: hashes.SHA384,  # TLS_SHA384_SHA384 (integrity only, RFC 9150; OpenSSL >= 3.4)
}


@dataclass(frozen=True)
class Tls12Secrets:
    """What a TLS 1.2 (or 1.0/1.1) session needs: `SSL_SESSION.master_key` and the random."""

    client_random: bytes
    master_key: bytes


@dataclass(frozen=True)
class Tls13Secrets:
    """Raw TLS 1.3 fields of OpenSSL's SSL (SSL_CONNECTION in 3.x); secrets are 64-byte arrays."""

    client_random: bytes
    cipher_id: int  # SSL_CIPHER.id, e.g. 0x03001301
    handshake_secret: bytes
    handshake_traffic_hash: bytes
    client_app_traffic_secret: bytes
    server_app_traffic_secret: bytes
    exporter_master_secret: bytes


class KeyedHmac:
    """HMAC (RFC 2104) under one key, for many short messages.

    The key's inner and outer pads are hashed once; each message then costs two copies of
    those states. `hmac.digest` pads and hashes the key again at every call (and goes through
    OpenSSL's HMAC objects): 2.6 us a message here, against 0.9 us so. A TLS 1.3 secret is
    expanded into a key and an IV, and a TLS 1.2 PRF runs four to eight HMACs under the master
    secret: those are the calls a checked session is made of.
    """

    __slots__ = ("_inner", "_outer", "digest_size")

    _IPAD = bytes(x ^ 0x36 for x in range(256))
    _OPAD = bytes(x ^ 0x5C for x in range(256))

    def __init__(self, key: bytes, digest: str) -> None:
        new = getattr(hashlib, digest)  # "sha1", "sha256", "sha384": hashlib's constructors
        inner = new()
        if len(key) > inner.block_size:
            key = new(key).digest()
        key = key.ljust(inner.block_size, b"\0")
        inner.update(key.translate(self._IPAD))
        self._inner = inner
        self._outer = new(key.translate(self._OPAD))
        self.digest_size = inner.digest_size

    def __call__(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def hkdf_expand_labels(
    secret: bytes, labels: Sequence[tuple[str, bytes, int]], algorithm: hashes.HashAlgorithm
) -> list[bytes]:
    """HKDF-Expand-Label of RFC 8446 section 7.1 (the label gets the "tls13 " prefix), for
    each (label, context, length) of `labels`, all from one secret.

    Every label keytap derives is at most one hash long, where HKDF-Expand (RFC 5869 2.3) is
    a single HMAC (of `expand_label_message`), done by a `KeyedHmac`; longer ones go through
    `cryptography`.
    """
    mac = None
    out = []
    for label, context, length in labels:
        if length > algorithm.digest_size:
            info = expand_label_message(label, context, length)[:-1]
            out.append(HKDFExpand(algorithm=algorithm, length=length, info=info).derive(secret))
            continue
        mac = mac or KeyedHmac(secret, algorithm.name)
        out.append(mac(expand_label_message(label, context, length))[:length])
    return out


def expand_label_message(label: str, context: bytes, length: int) -> bytes:
    """What HKDF-Expand-Label's one HMAC hashes (RFC 5869 2.3's T(1)): HkdfLabel, then 0x01."""
    if len(context) > 255:
        raise ValueError("context out of range for HkdfLabel")
    return _hkdf_label(label, length) + bytes((len(context),)) + context + b"\x01"


def hkdf_expand_label(
    secret: bytes, label: str, context: bytes, length: int, algorithm: hashes.HashAlgorithm
) -> bytes:
    """One HKDF-Expand-Label (see `hkdf_expand_labels`)."""
    return hkdf_expand_labels(secret, ((label, context, length),), algorithm)[0]


@functools.lru_cache(maxsize=64)
def _hkdf_label(label: str, length: int) -> bytes:
    """HkdfLabel's length and label fields (the context follows)."""
    full_label = b"tls13 " + label.encode("ascii")
    if len(full_label) > 255 or not 0 < length <= 0xFFFF:
        raise ValueError("label or length out of range for HkdfLabel")
    return struct.pack("!HB", length, len(full_label)) + full_label


def digest_for_cipher(cipher_id: int) -> hashes.HashAlgorithm:
    """The key-schedule hash of a TLS 1.3 suite, from OpenSSL's id (or the bare IANA value)."""
    suite = cipher_id - _OPENSSL_ID_BASE if cipher_id >> 16 == _OPENSSL_ID_BASE >> 16 else cipher_id
    algorithm = _SUITE_HASH.get(suite)
    if algorithm is None:
        raise ValueError(f"not a known TLS 1.3 cipher id: {cipher_id:#x}")
    return algorithm()


def keylog_lines(s: Tls12Secrets | Tls13Secrets) -> tuple[str, ...]:
    """NSS key-log lines for one session.

    A secret that is still all zeros was not set yet when the probe read it (e.g. the exporter
    secret before the handshake ends); its line is left out rather than handing Wireshark a
    wrong key. The result may therefore be empty.
    """
    if len(s.client_random) != CLIENT_RANDOM_LEN:
        raise ValueError(f"client_random must be {CLIENT_RANDOM_LEN} bytes")
    random_hex = s.client_random.hex()
    if isinstance(s, Tls12Secrets):
        if len(s.master_key) != TLS12_MASTER_SECRET_LEN:
            raise ValueError(f"master_key must be {TLS12_MASTER_SECRET_LEN} bytes")
        if not any(s.master_key):
            return ()
        return (f"CLIENT_RANDOM {random_hex} {s.master_key.hex()}",)

    algorithm = digest_for_cipher(s.cipher_id)
    n = algorithm.digest_size
    fields = (
        s.handshake_secret,
        s.handshake_traffic_hash,
        s.client_app_traffic_secret,
        s.server_app_traffic_secret,
        s.exporter_master_secret,
    )
    if any(len(f) < n for f in fields):
        raise ValueError(f"TLS 1.3 secrets must hold at least {n} bytes for {algorithm.name}")
    hs_secret, hs_hash, c_ap, s_ap, exporter = (f[:n] for f in fields)

    secrets: list[tuple[str, bytes]] = []
    if any(hs_secret) and any(hs_hash):
        client_hs, server_hs = hkdf_expand_labels(
            hs_secret, (("c hs traffic", hs_hash, n), ("s hs traffic", hs_hash, n)), algorithm)
        secrets += [("CLIENT_HANDSHAKE_TRAFFIC_SECRET", client_hs),
                    ("SERVER_HANDSHAKE_TRAFFIC_SECRET", server_hs)]
    secrets += [
        ("CLIENT_TRAFFIC_SECRET_0", c_ap),
        ("SERVER_TRAFFIC_SECRET_0", s_ap),
        ("EXPORTER_SECRET", exporter),
    ]
    return tuple(f"{name} {random_hex} {secret.hex()}" for name, secret in secrets if any(secret))
