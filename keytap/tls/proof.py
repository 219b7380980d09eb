"""Prove key-log lines from the wire: a secret counts only if a record of its session decrypts.

Why this exists: a uprobe reads secrets out of OpenSSL's structs at offsets from a table, and a
wrong table (a patch release that added a pointer, a build with other options) still yields
64 plausible random-looking bytes. Nothing downstream notices - Wireshark silently fails to
decrypt - so keytap checks every line against the captured records. No library does that job:
TLS stacks verify records only inside their own state machine, holding their own keys, and
Wireshark/tshark report no per-secret verdict. So the few record formats are written out here,
by hand, on top of the `cryptography` package's AEADs, AES-CBC and the stdlib's HMAC.

What VERIFIED means: the record that the line's secret must protect (the first one under that
key, sequence number 0; a later one only where the position is unknown, see below) decrypts
under keys derived from the secret, with its AEAD tag (TLS 1.2 CBC: its HMAC, and the padding)
verifying; a TLS 1.2 Finished must also decrypt to a Finished message. A forged tag is out of
reach, so VERIFIED proves the secret byte for byte. It does not prove the line's client random
beyond matching the session's ClientHello (lines of another random are `ignored`), nor anything
about secrets that protect no record seen (EXPORTER_SECRET never does: always UNCHECKED).

What FAILED means: the record is there, complete, at the position where this secret must apply,
and its tag/MAC does not verify under it. Missing records (a connection still going, a capture
that started late) give UNCHECKED, never FAILED, and `pending` says which labels more records
could still settle, so the caller can call again.

Positions: TLS 1.3 handshake keys protect a side's first encrypted record; the application key
the record after that side's Finished (found by decrypting the handshake records under the
handshake key). Where that walk is impossible (no handshake line, or it failed) or where 0-RTT
data may precede the client's handshake records, each candidate record is tried at sequence 0
instead: success is still a proof, failure only UNCHECKED. TLS 1.2: each side's first record
after its ChangeCipherSpec, sequence 0, so full and abbreviated handshakes alike.

Not checked (UNCHECKED, never FAILED): TLS 1.0/1.1 and SSL 3, TLS 1.2 CCM and any suite not in
the tables below (null, 3DES, Camellia, ARIA, GOST ...), the RFC 9150 integrity-only TLS 1.3
suites, CLIENT_EARLY_TRAFFIC_SECRET, and labels this module does not know.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from keytap.tls.keylog import KeyedHmac, expand_label_message
from keytap.tls.records import (
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_CHANGE_CIPHER_SPEC,
    CT_HANDSHAKE,
    TlsRecord,
)

__all__ = ["REQUIRED", "ProofMemo", "SessionProof", "TlsRecord", "Verdict", "judged", "prove"]

CLIENT_RANDOM = "CLIENT_RANDOM"
CLIENT_HANDSHAKE = "CLIENT_HANDSHAKE_TRAFFIC_SECRET"
SERVER_HANDSHAKE = "SERVER_HANDSHAKE_TRAFFIC_SECRET"
CLIENT_TRAFFIC_0 = "CLIENT_TRAFFIC_SECRET_0"
SERVER_TRAFFIC_0 = "SERVER_TRAFFIC_SECRET_0"
EXPORTER = "EXPORTER_SECRET"
_TLS13_LABELS = frozenset((CLIENT_HANDSHAKE, SERVER_HANDSHAKE, CLIENT_TRAFFIC_0, SERVER_TRAFFIC_0))
REQUIRED = {"1.2": frozenset({CLIENT_RANDOM}), "1.3": _TLS13_LABELS}  # what Wireshark needs
_UNPROVABLE = frozenset({EXPORTER})  # no record is ever sent under it
_TRAFFIC_SIDES = {CLIENT_TRAFFIC_0: 0, SERVER_TRAFFIC_0: 1}  # the side: an index of `finished`

_HS_CLIENT_HELLO = 1
_HS_SERVER_HELLO = 2
_HS_FINISHED = 20
_EXT_ENCRYPT_THEN_MAC = 22  # RFC 7366
_EXT_EARLY_DATA = 42
_EXT_SUPPORTED_VERSIONS = 43
# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest (SHA-256 of its name).
_HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
_TLS12 = 0x0303
_TLS13 = 0x0304
# How many records are tried at sequence 0 when a key's first record cannot be located.
_TRIAL_LIMIT = 16
# A hello is a few KiB at most; a plaintext handshake stream this long without one is garbage.
_MAX_HELLO_STREAM = 1 << 17
_SEQ0 = bytes(8)


class Verdict(enum.Enum):
    VERIFIED = "verified"  # a record of the session decrypts under the secret, tag verifying
    FAILED = "failed"  # the record it must protect is there and does not verify under it
    UNCHECKED = "unchecked"  # no record to check it against (yet, or ever)


@dataclass(frozen=True)
class SessionProof:
    """Verdicts for one session's key-log lines, keyed by label (one verdict per label)."""

    secrets: dict[str, Verdict]
    details: dict[str, str] = field(default_factory=dict)  # label -> why, one short sentence
    pending: frozenset[str] = frozenset()  # UNCHECKED labels that more records could settle
    version: int | None = None  # negotiated protocol version (0x0303, 0x0304), once seen
    cipher_suite: int | None = None  # IANA value, once the ServerHello was seen
    client_random: bytes | None = None  # from the ClientHello
    ignored: tuple[str, ...] = ()  # lines not used: another client random, or not key-log lines

    def _with(self, verdict: Verdict) -> tuple[str, ...]:
        return tuple(label for label, v in self.secrets.items() if v is verdict)

    @property
    def verified(self) -> tuple[str, ...]:
        return self._with(Verdict.VERIFIED)

    @property
    def failed(self) -> tuple[str, ...]:
        return self._with(Verdict.FAILED)

    @property
    def unchecked(self) -> tuple[str, ...]:
        return self._with(Verdict.UNCHECKED)

    @property
    def ok(self) -> bool:
        """No line was refuted by the wire (some may still be unproven)."""
        return not self.failed

    @property
    def settled(self) -> bool:
        """More records would change nothing: call again only while this is False."""
        return not self.pending


@dataclass(frozen=True, slots=True)
class _Check:
    verdict: Verdict
    detail: str
    pending: bool = False  # more records could change it (a ProofMemo keeps it only if not)


def _unchecked(detail: str, pending: bool = False) -> _Check:
    return _Check(Verdict.UNCHECKED, detail, pending)


_RANK = {Verdict.FAILED: 2, Verdict.UNCHECKED: 1, Verdict.VERIFIED: 0}


class ProofMemo:
    """What earlier proofs of one session settled, for its next proof with more records.

    A session's records only ever grow at the end, so a ServerHello found, a check decided
    (not pending) and a handshake walk that reached its Finished stay true as more come: the
    next call redoes none of them. The reorder buffer keeps one per recorded session, whose
    keys are often proven twice: when they come, and once its records are complete.
    """

    __slots__ = ("checks", "client", "lines", "start", "walks")

    def __init__(self) -> None:
        # (lines, client random) -> their secrets by label, and the lines not used
        self.lines: dict[tuple[tuple[str, ...], bytes | None],
                         tuple[dict[str, list[bytes]], list[str]]] = {}
        self.client: _ClientStart | None = None  # for as many client records as it says
        self.start: _ServerStart | None = None
        # (what, side, secret) -> the check and the index of the record it verified
        self.checks: dict[tuple[str, str, bytes], tuple[_Check, int | None]] = {}
        self.walks: dict[tuple[str, bytes], _Walk] = {}  # (side, handshake secret) -> walk


def prove(
    client_records: Sequence[TlsRecord],
    server_records: Sequence[TlsRecord],
    lines: Sequence[str],
    memo: ProofMemo | None = None,
) -> SessionProof:
    """Check each key-log line against the session's records (see the module docstring).

    `client_records` start at the client's first ClientHello, `server_records` at the server's
    first ServerHello or HelloRetryRequest, in order; either may be a prefix. `memo`: the
    same session's from earlier calls (their records a prefix of these). Never raises.
    """
    try:
        if memo is None or memo.client is None:  # a first proof: try the common case's
            at_once = _tls13_at_once(client_records, server_records, lines)
            if at_once is not None:
                return at_once
        return _prove(client_records, server_records, lines,
                      ProofMemo() if memo is None else memo)
    except Exception as exc:  # belt and braces for the capture loop: the parsers do not raise
        labels = {}
        for line in lines:
            parts = line.split() if isinstance(line, str) else []
            if parts and not parts[0].startswith("#"):
                labels[parts[0]] = Verdict.UNCHECKED
        why = f"internal error: {type(exc).__name__}: {exc}"
        return SessionProof(labels, dict.fromkeys(labels, why))


def judged(proof: SessionProof, lines: Sequence[str],
           finished: tuple[bool, bool]) -> tuple[bool, tuple[int, ...]]:
    """Whether the session's records refute `lines` (one key event's, non-empty), and which of
    them (their indices) the proof covers: none until it covers what the protocol needs.

    Every required secret is verified, except a traffic secret whose side closed without
    sending a record under it (`finished`: the client, the server will send no more): no
    record can ever check it, and none needs it, so its line is left out. The exporter secret
    never can be checked and is kept with the others.
    """
    secrets = proof.secrets
    if any(verdict is Verdict.FAILED for verdict in secrets.values()):
        return True, ()
    protocol = "1.2" if lines[0].startswith(CLIENT_RANDOM + " ") else "1.3"
    if not REQUIRED[protocol] <= secrets.keys():
        return False, ()
    keep = set()
    for label, verdict in secrets.items():
        if verdict is Verdict.VERIFIED or label in _UNPROVABLE:
            keep.add(label)
        elif not (verdict is Verdict.UNCHECKED and label in _TRAFFIC_SIDES
                  and finished[_TRAFFIC_SIDES[label]]):
            return False, ()
    return False, tuple(i for i, line in enumerate(lines) if line.split(" ", 1)[0] in keep)


# --- key-log lines ------------------------------------------------------------------------------


def _parse_lines(
    lines: Iterable[str], client_random: bytes | None
) -> tuple[dict[str, list[bytes]], list[str]]:
    """label -> its distinct secrets (in order), and the lines that are not this session's."""
    by_label: dict[str, list[bytes]] = {}
    ignored: list[str] = []
    random_hex = client_random.hex() if client_random is not None else None
    for line in lines:
        parts = line.split() if isinstance(line, str) else ()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            if len(parts) != 3 or len(parts[1]) != 64:
                raise ValueError
            bytes.fromhex(parts[1])  # well-formed, whichever session it names
            secret = bytes.fromhex(parts[2])
        except ValueError:
            ignored.append(line)
            continue
        if not secret or (random_hex is not None and parts[1].lower() != random_hex):
            ignored.append(line)
            continue
        secrets = by_label.setdefault(parts[0], [])
        if secret not in secrets:
            secrets.append(secret)
    return by_label, ignored


# --- plaintext handshake ------------------------------------------------------------------------


_EXTENSION_HEADER = struct.Struct("!HH")  # type, length


def _u16(b: bytes, i: int) -> int:
    return (b[i] << 8) | b[i + 1]


def _extensions(body: bytes, p: int) -> dict[int, bytes] | None:
    """The extensions block starting at body[p] (absent: empty), or None if it is malformed."""
    n = len(body)
    if p == n:
        return {}
    if p + 2 > n:
        return None
    end = p + 2 + _u16(body, p)
    if end > n:
        return None
    p += 2
    out: dict[int, bytes] = {}
    unpack = _EXTENSION_HEADER.unpack_from
    while p + 4 <= end:
        ext_type, ext_len = unpack(body, p)
        p += 4
        if p + ext_len > end:
            return None
        out.setdefault(ext_type, body[p : p + ext_len])
        p += ext_len
    return out if p == end else None


@dataclass(frozen=True, slots=True)
class _ClientHello:
    random: bytes
    extensions: frozenset[int]


@dataclass(frozen=True, slots=True)
class _ServerHello:
    random: bytes
    version: int  # negotiated: supported_versions if present, else legacy_version
    cipher_suite: int
    extensions: frozenset[int]


def _parse_client_hello(body: bytes) -> _ClientHello | None:
    if len(body) < 35:
        return None
    random = body[2:34]
    p = 35 + body[34]  # session id
    if p + 2 > len(body):
        return _ClientHello(random, frozenset())
    p += 2 + _u16(body, p)  # cipher suites
    if p + 1 > len(body):
        return _ClientHello(random, frozenset())
    p += 1 + body[p]  # compression methods
    exts = _extensions(body, p) if p <= len(body) else None
    return _ClientHello(random, frozenset(exts or ()))


def _parse_server_hello(body: bytes) -> _ServerHello | None:
    if len(body) < 35:
        return None
    random = body[2:34]
    p = 35 + body[34]  # session id
    if p + 3 > len(body):
        return None
    suite = _u16(body, p)
    exts = _extensions(body, p + 3)  # after cipher_suite and legacy_compression_method
    if exts is None:
        return None
    version = _u16(body, 0)
    selected = exts.get(_EXT_SUPPORTED_VERSIONS)
    if selected is not None:
        if len(selected) != 2:
            return None
        version = _u16(selected, 0)
    return _ServerHello(random, version, suite, frozenset(exts))


def _plain_messages(records: Sequence[TlsRecord]) -> tuple[list[tuple[int, bytes, int]], bool]:
    """The client's handshake messages, each with the index of the record it ends in; and
    whether the stream ends inside a message.

    Only the hellos are used. Records of other types are skipped (TLS 1.3's compatibility CCS,
    encrypted records); TLS 1.2's encrypted Finished (type 22 after the CCS) makes garbage
    messages after the ClientHello, which nothing reads.
    """
    out: list[tuple[int, bytes, int]] = []
    buf = bytearray()
    for i, record in enumerate(records):
        if record.content_type != CT_HANDSHAKE:
            continue
        buf += record.fragment
        while len(buf) >= 4:
            n = (buf[1] << 16) | (buf[2] << 8) | buf[3]
            if len(buf) < 4 + n:
                break
            out.append((buf[0], bytes(buf[4 : 4 + n]), i))
            del buf[: 4 + n]
        if len(buf) > _MAX_HELLO_STREAM:
            break
    return out, bool(buf)


@dataclass(frozen=True, slots=True)
class _ClientStart:
    """What the client's plaintext records say, as of its first `records` records."""

    records: int
    hello: _ClientHello | None  # its first ClientHello, parsed
    hellos: tuple[int, ...]  # the index of the record each ClientHello ends in
    waiting: bool  # no handshake message complete yet, and more may come


def _client_start(records: Sequence[TlsRecord]) -> _ClientStart:
    messages, partial = _plain_messages(records)
    hello = None
    if messages and messages[0][0] == _HS_CLIENT_HELLO:
        hello = _parse_client_hello(messages[0][1])
    hellos = tuple(index for msg_type, _, index in messages if msg_type == _HS_CLIENT_HELLO)
    return _ClientStart(len(records), hello, hellos, not messages and (partial or not records))


@dataclass(frozen=True, slots=True)
class _ServerStart:
    hello: _ServerHello
    next_index: int  # the record after the one the (real) ServerHello ended in
    hrr: bool


def _server_start(records: Sequence[TlsRecord]) -> _ServerStart | _Check:
    buf = bytearray()
    hrr = False
    for i, record in enumerate(records):
        ct = record.content_type
        if ct == CT_APPLICATION_DATA:
            return _unchecked("encrypted server record before any ServerHello")
        if ct != CT_HANDSHAKE:
            continue
        buf += record.fragment
        while len(buf) >= 4:
            n = (buf[1] << 16) | (buf[2] << 8) | buf[3]
            if len(buf) < 4 + n:
                break
            msg_type, body = buf[0], bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            hello = _parse_server_hello(body) if msg_type == _HS_SERVER_HELLO else None
            if hello is None:
                return _unchecked("the server's first handshake message is no ServerHello")
            if hello.random == _HRR_RANDOM:
                hrr = True
                continue
            return _ServerStart(hello, i + 1, hrr)
        if len(buf) > _MAX_HELLO_STREAM:
            return _unchecked("no complete ServerHello in the server's first records")
    return _unchecked("no ServerHello seen yet", pending=True)


# --- TLS 1.3 ------------------------------------------------------------------------------------


class _Aead(Protocol):
    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


@dataclass(frozen=True, slots=True, eq=False)  # one per suite: a cache key, hashed by identity
class _Suite13:
    digest: str  # the key schedule's hash (hashlib name)
    key_len: int
    tag_len: int
    aead: Callable[[bytes], _Aead]
    key_label: bytes = b""  # HKDF-Expand-Label's HMAC message for the key, and for the IV
    iv_label: bytes = expand_label_message("iv", b"", 12)
    finished_len: int = 0  # a record holding a Finished alone, unpadded

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_label", expand_label_message("key", b"", self.key_len))
        verify_data = getattr(hashlib, self.digest)().digest_size
        object.__setattr__(self, "finished_len", 4 + verify_data + 1 + self.tag_len)


_SUITES13: dict[int, _Suite13] = {
    0x1301: _Suite13("sha256", 16, 16, AESGCM),
    0x1302: _Suite13("sha384", 32, 16, AESGCM),
    0x1303: _Suite13("sha256", 32, 16, ChaCha20Poly1305),
    0x1304: _Suite13("sha256", 16, 16, lambda key: AESCCM(key, 16)),
    0x1305: _Suite13("sha256", 16, 8, lambda key: AESCCM(key, 8)),
}
_BAD_TAG = object()  # decrypt(): the tag does not verify
_MALFORMED = object()  # decrypt(): no key could make this record valid (too short)


@functools.lru_cache(maxsize=1024)
def _keys13(suite: _Suite13, secret: bytes) -> _Keys13:
    """A session's keys are derived once: a proven layout's session is checked when its keys
    come and again when its records are complete, and most of a check is key derivation."""
    return _Keys13(suite, secret)


class _Keys13:
    """The traffic keys of one TLS 1.3 secret (RFC 8446 7.3) and record decryption (5.2)."""

    __slots__ = ("_aead", "_iv", "_iv0", "_tag_len")

    def __init__(self, suite: _Suite13, secret: bytes) -> None:
        expand = KeyedHmac(secret, suite.digest)  # HKDF-Expand-Label: one HMAC each
        self._iv0 = expand(suite.iv_label)[:12]  # the nonce of sequence number 0
        self._iv = int.from_bytes(self._iv0, "big")
        self._aead = suite.aead(expand(suite.key_label)[:suite.key_len])
        self._tag_len = suite.tag_len

    def decrypt(self, record: TlsRecord, seq: int) -> tuple[int, bytes] | object:
        """(inner content type, content), `_BAD_TAG`, or `_MALFORMED`."""
        fragment = record.fragment
        if len(fragment) <= self._tag_len:
            return _MALFORMED
        nonce = (self._iv ^ seq).to_bytes(12, "big") if seq else self._iv0
        try:
            plain = self._aead.decrypt(nonce, fragment, record.header)
        except (InvalidTag, ValueError, OverflowError):
            return _BAD_TAG
        inner = plain.rstrip(b"\x00")  # RFC 8446 5.4: zero padding after the content type
        if not inner:
            return 0, b""  # the tag verified, but no content type: the walk stops here
        return inner[-1], inner[:-1]


@dataclass(frozen=True, slots=True)
class _Walk:
    """Where a side's application key starts, as far as its handshake records tell."""

    app_index: int | None  # exact index of the first record under the application key
    trial_from: int  # else: try records from here on at sequence 0
    stopped: str | None = None  # why the application key will never be reached, if so


def _walk_handshake(keys: _Keys13, enc: Sequence[TlsRecord], first: int,
                    first_plain: tuple[int, bytes] | None) -> _Walk:
    """Follow a side's handshake records from enc[first] (verified, seq 0; `first_plain`: what
    it decrypted to, if at hand) to its Finished."""
    buf = bytearray()
    for seq, i in enumerate(range(first, len(enc))):
        if seq == 0 and first_plain is not None:
            result: tuple[int, bytes] | object = first_plain
        else:
            result = keys.decrypt(enc[i], seq)
        if not isinstance(result, tuple):
            return _Walk(None, i)  # lost the thread: the record may already be the next key's
        inner_type, content = result
        if inner_type == CT_ALERT:
            return _Walk(None, i + 1, "an alert under the handshake key ends the handshake")
        if inner_type != CT_HANDSHAKE:
            return _Walk(None, i + 1)
        buf += content
        finished = False
        while len(buf) >= 4:
            n = (buf[1] << 16) | (buf[2] << 8) | buf[3]
            if len(buf) < 4 + n:
                break
            finished = finished or buf[0] == _HS_FINISHED
            del buf[: 4 + n]
        if finished:  # RFC 8446 5.1: the key changes at a record boundary after Finished
            return _Walk(i + 1, i + 1)
    return _Walk(None, len(enc))  # the Finished has not been seen yet


def _first_record(
    keys: _Keys13,
    enc: Sequence[TlsRecord],
    index: int | None,
    trial_from: int,
    side: str,
    what: str,
) -> tuple[_Check, int | None, tuple[int, bytes] | None]:
    """Check a key on enc[index] at seq 0, or (index None) on the first record from
    `trial_from` that verifies. Returns the check, the index of the verified record and what
    it decrypted to."""
    if index is not None:
        if index >= len(enc):
            why = f"no {side} record under the {what} key yet"
            return _unchecked(why, pending=True), None, None
        result = keys.decrypt(enc[index], 0)
        if result is _MALFORMED:
            why = f"the {side}'s first {what} record is too short to check"
            return _unchecked(why), None, None
        if not isinstance(result, tuple):
            why = f"tag fails on the {side}'s first {what} record"
            return _Check(Verdict.FAILED, why), None, None
        return _Check(Verdict.VERIFIED, f"the {side}'s first {what} record decrypts"), index, result
    stop = min(len(enc), trial_from + _TRIAL_LIMIT)
    for i in range(trial_from, stop):
        result = keys.decrypt(enc[i], 0)
        if isinstance(result, tuple):
            why = f"{side} record {i} decrypts under the {what} key"
            return _Check(Verdict.VERIFIED, why), i, result
    exhausted = stop - trial_from >= _TRIAL_LIMIT
    why = f"no {side} record decrypts under it (position of the {what} key unknown)"
    return _unchecked(why, pending=not exhausted), None, None


def _prove13_side(
    suite: _Suite13,
    enc: Sequence[TlsRecord],
    hs_secrets: Sequence[bytes],
    ap_secrets: Sequence[bytes],
    side: str,
    exact_first: bool,
    memo: ProofMemo,
) -> tuple[list[_Check], list[_Check]]:
    """One direction: its handshake-key checks and application-key checks.

    `enc` are the direction's encrypted records from where its handshake key may start;
    `exact_first` says the first of them is certainly under the handshake key (no 0-RTT).
    """
    hs_checks: list[_Check] = []
    walk: _Walk | None = None
    for secret in hs_secrets:
        key = ("handshake", side, secret)
        kept, plain = memo.checks.get(key), None
        if kept is None:
            check, at, plain = _first_record(_keys13(suite, secret), enc,
                                             0 if exact_first else None, 0, side, "handshake")
            kept = _keep(memo, key, (check, at))
        check, at = kept
        hs_checks.append(check)
        if at is not None and walk is None:
            walk = memo.walks.get((side, secret))
            if walk is None:
                walk = _walk_handshake(_keys13(suite, secret), enc, at, plain)
                if walk.app_index is not None or walk.stopped is not None:
                    memo.walks[side, secret] = walk  # reached its Finished: final
    if walk is None:  # no handshake key that works: its records are at least the first one
        walk = _Walk(None, 1 if exact_first else 0)
    ap_checks: list[_Check] = []
    for secret in ap_secrets:
        if walk.stopped is not None:
            ap_checks.append(_unchecked(walk.stopped))
            continue
        key = ("application", side, secret)
        kept = memo.checks.get(key)
        if kept is None:
            check, at, _ = _first_record(_keys13(suite, secret), enc, walk.app_index,
                                         walk.trial_from, side, "application")
            kept = _keep(memo, key, (check, at))
        ap_checks.append(kept[0])
    return hs_checks, ap_checks


def _keep(
    memo: ProofMemo,
    key: tuple[str, str, bytes],
    made: tuple[_Check, int | None],
) -> tuple[_Check, int | None]:
    """A check just made, kept for the next call if it is decided."""
    if not made[0].pending:
        memo.checks[key] = made
    return made


def _prove13(
    hello: _ServerHello,
    start: _ServerStart,
    client_records: Sequence[TlsRecord],
    client: _ClientStart,
    server_records: Sequence[TlsRecord],
    secrets: dict[str, list[bytes]],
    memo: ProofMemo,
) -> dict[str, list[_Check]]:
    suite = _SUITES13.get(hello.cipher_suite)
    out: dict[str, list[_Check]] = {}
    if suite is None:
        why = _unchecked(f"TLS 1.3 suite {hello.cipher_suite:#06x} is not checked")
        return {label: [why] for label in _TLS13_LABELS if label in secrets}
    # Server: every encrypted record after the ServerHello (CCS records carry no sequence number).
    server_enc = [
        r for r in server_records[start.next_index :] if r.content_type == CT_APPLICATION_DATA
    ]
    hs, ap = _prove13_side(
        suite,
        server_enc,
        secrets.get(SERVER_HANDSHAKE, ()),
        secrets.get(SERVER_TRAFFIC_0, ()),
        "server",
        exact_first=True,
        memo=memo,
    )
    out[SERVER_HANDSHAKE], out[SERVER_TRAFFIC_0] = hs, ap
    # Client: encrypted records after its last plaintext ClientHello (after an HRR: the second).
    hellos = client.hellos
    if start.hrr and len(hellos) < 2:
        wait = _unchecked(
            "the client's second ClientHello (after the HRR) not seen yet", pending=True
        )
        out[CLIENT_HANDSHAKE] = [wait] * len(secrets.get(CLIENT_HANDSHAKE, ()))
        out[CLIENT_TRAFFIC_0] = [wait] * len(secrets.get(CLIENT_TRAFFIC_0, ()))
    else:
        client_enc = [
            r for r in client_records[hellos[-1] + 1 :] if r.content_type == CT_APPLICATION_DATA
        ]
        # 0-RTT records may come first (offered, no HRR): position of the handshake key unknown.
        assert client.hello is not None
        early = _EXT_EARLY_DATA in client.hello.extensions and not start.hrr
        hs, ap = _prove13_side(
            suite,
            client_enc,
            secrets.get(CLIENT_HANDSHAKE, ()),
            secrets.get(CLIENT_TRAFFIC_0, ()),
            "client",
            exact_first=not early,
            memo=memo,
        )
        out[CLIENT_HANDSHAKE], out[CLIENT_TRAFFIC_0] = hs, ap
    return {label: checks for label, checks in out.items() if checks}


def _tls13_at_once(
    client: Sequence[TlsRecord], server: Sequence[TlsRecord], lines: Sequence[str]
) -> SessionProof | None:
    """The common TLS 1.3 session proven without the handshake walk, at half its cost; None
    leaves it to `_prove`.

    It asks for the shape nearly every session has: a ClientHello and a ServerHello alone in
    their sides' first records (no HelloRetryRequest), each side's Finished alone in a record
    (found by its length), the four TLS 1.3 lines of one random. Then each handshake secret
    must decrypt its side's first encrypted record, and each traffic secret the record after
    its side's Finished, all at sequence 0; where that record is not there yet, the Finished
    itself must decrypt as one, and the traffic secret waits (UNCHECKED, pending), as `_prove`
    would have it. Anything else (another shape, a key that fails) proves nothing here: a
    verdict FAILED is always `_prove`'s, with its reasons.
    """
    if len(client) < 2 or len(server) < 2:
        return None
    client_hello = _lone_message(client[0], _HS_CLIENT_HELLO)
    server_body = _lone_message(server[0], _HS_SERVER_HELLO)
    if client_hello is None or len(client_hello) < 34 or server_body is None:
        return None
    server_hello = _parse_server_hello(server_body)
    if (server_hello is None or server_hello.version != _TLS13
            or server_hello.random == _HRR_RANDOM):
        return None
    suite = _SUITES13.get(server_hello.cipher_suite)
    random = client_hello[2:34]
    by_label, ignored = _parse_lines(lines, random)
    if (suite is None or ignored or by_label.keys() - {EXPORTER} != _TLS13_LABELS
            or any(len(each) != 1 for each in by_label.values())):
        return None
    secrets = {label: each[0] for label, each in by_label.items()}
    checks: dict[str, _Check] = {}
    for side, records, hs_label, app_label in (
            ("server", server, SERVER_HANDSHAKE, SERVER_TRAFFIC_0),
            ("client", client, CLIENT_HANDSHAKE, CLIENT_TRAFFIC_0)):
        side_checks = _side_at_once(suite, side, records, secrets[hs_label], secrets[app_label])
        if side_checks is None:
            return None
        checks[hs_label], checks[app_label] = side_checks
    if EXPORTER in secrets:
        checks[EXPORTER] = _EXPORTER_UNCHECKED
    return SessionProof(
        {label: checks[label].verdict for label in secrets},
        {label: checks[label].detail for label in secrets},
        frozenset(label for label, check in checks.items() if check.pending),
        _TLS13, server_hello.cipher_suite, random)


def _lone_message(record: TlsRecord, msg_type: int) -> bytes | None:
    """The body of a plaintext handshake message of `msg_type` that fills `record` alone."""
    fragment = record.fragment
    if (record.content_type != CT_HANDSHAKE or len(fragment) < 4 or fragment[0] != msg_type
            or (fragment[1] << 16 | fragment[2] << 8 | fragment[3]) + 4 != len(fragment)):
        return None
    return fragment[4:]


def _side_at_once(suite: _Suite13, side: str, records: Sequence[TlsRecord],
                  handshake: bytes, traffic: bytes) -> tuple[_Check, _Check] | None:
    """One side's two secrets checked as `_tls13_at_once` says, or None."""
    enc = [r for r in records[1:] if r.content_type == CT_APPLICATION_DATA]
    finished = next((i for i, r in enumerate(enc) if len(r.fragment) == suite.finished_len), None)
    if finished is None:
        return None
    keys = _keys13(suite, handshake)
    if not isinstance(first := keys.decrypt(enc[0], 0), tuple):
        return None
    handshake_verified, traffic_verified, traffic_waits = _AT_ONCE[side]
    if finished + 1 < len(enc):
        if not isinstance(_keys13(suite, traffic).decrypt(enc[finished + 1], 0), tuple):
            return None
        return handshake_verified, traffic_verified
    plain = first if finished == 0 else keys.decrypt(enc[finished], finished)
    if not (isinstance(plain, tuple) and plain[0] == CT_HANDSHAKE
            and plain[1][:1] == bytes((_HS_FINISHED,))):
        return None
    return handshake_verified, traffic_waits


# side -> its checks at once: handshake secret verified, traffic secret verified, or waiting
_AT_ONCE = {side: (_Check(Verdict.VERIFIED, f"the {side}'s first handshake record decrypts"),
                   _Check(Verdict.VERIFIED, f"the {side}'s first application record decrypts"),
                   _unchecked(f"no {side} record under the application key yet", pending=True))
            for side in ("server", "client")}
_EXPORTER_UNCHECKED = _unchecked("the exporter secret protects no record")


# --- TLS 1.2 ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)  # one per suite group: hashed by identity
class _Suite12:
    kind: str  # "gcm", "chacha" or "cbc"
    key_len: int
    mac: str | None  # HMAC hash of a CBC suite (hashlib name)
    prf: str  # hashlib name of the PRF's HMAC


# IANA values (cross-checked against `openssl ciphers -V` where OpenSSL 3.0 has the suite).
_SUITE_GROUPS12: tuple[tuple[_Suite12, str], ...] = (
    # AES-GCM, RFC 5288/5289/5487/8442: the 128-bit suites use SHA-256, the 256-bit SHA-384.
    (
        _Suite12("gcm", 16, None, "sha256"),
        "009C 009E 00A0 00A2 00A4 00A6 00A8 00AA 00AC C02B C02D C02F C031 D001",
    ),
    (
        _Suite12("gcm", 32, None, "sha384"),
        "009D 009F 00A1 00A3 00A5 00A7 00A9 00AB 00AD C02C C02E C030 C032 D002",
    ),
    # ChaCha20-Poly1305, RFC 7905.
    (_Suite12("chacha", 32, None, "sha256"), "CCA8 CCA9 CCAA CCAB CCAC CCAD CCAE"),
    # AES-CBC with HMAC-SHA1 (RFC 3268/4279/4492/5054/5489); TLS 1.2's PRF is SHA-256.
    (
        _Suite12("cbc", 16, "sha1", "sha256"),
        "002F 0030 0031 0032 0033 0034 008C 0090 0094 C004 C009 C00E C013 C018 C01D C01E C01F C035",
    ),
    (
        _Suite12("cbc", 32, "sha1", "sha256"),
        "0035 0036 0037 0038 0039 003A 008D 0091 0095 C005 C00A C00F C014 C019 C020 C021 C022 C036",
    ),
    # AES-CBC with HMAC-SHA256 (RFC 5246/5289/5487), and with HMAC-SHA384 and the SHA-384 PRF.
    (
        _Suite12("cbc", 16, "sha256", "sha256"),
        "003C 003E 003F 0040 0067 006C 00AE 00B2 00B6 C023 C025 C027 C029 C037",
    ),
    (_Suite12("cbc", 32, "sha256", "sha256"), "003D 0068 0069 006A 006B 006D"),
    (_Suite12("cbc", 32, "sha384", "sha384"), "00AF 00B3 00B7 C024 C026 C028 C02A C038"),
)
_SUITES12 = {int(i, 16): suite for suite, ids in _SUITE_GROUPS12 for i in ids.split()}
_MAC_LEN = {"sha1": 20, "sha256": 32, "sha384": 48}


def _prf(secret: bytes, label: bytes, seed: bytes, length: int, digest: str) -> bytes:
    """The TLS 1.2 PRF, P_hash (RFC 5246 section 5)."""
    mac = KeyedHmac(secret, digest)
    seed = label + seed
    out = bytearray()
    a = seed
    while len(out) < length:
        a = mac(a)
        out += mac(a + seed)
    return bytes(out[:length])


@dataclass(frozen=True, slots=True)
class _Keys12:
    """One side's write keys (RFC 5246 6.3)."""

    mac_key: bytes
    key: bytes
    iv: bytes


@functools.lru_cache(maxsize=1024)  # derived once per session, as _keys13
def _key_block(
    suite: _Suite12,
    master: bytes,
    client_random: bytes,
    server_random: bytes,
) -> tuple[_Keys12, _Keys12]:
    mac_len = _MAC_LEN[suite.mac] if suite.mac else 0
    iv_len = {"gcm": 4, "chacha": 12}.get(suite.kind, 0)  # CBC: explicit per-record IVs
    k = suite.key_len
    block = _prf(
        master,
        b"key expansion",
        server_random + client_random,
        2 * (mac_len + k + iv_len),
        suite.prf,
    )
    p = 2 * mac_len
    client = _Keys12(block[:mac_len], block[p : p + k], block[p + 2 * k : p + 2 * k + iv_len])
    server = _Keys12(block[mac_len:p], block[p + k : p + 2 * k], block[p + 2 * k + iv_len :])
    return client, server


def _decrypt12(suite: _Suite12, keys: _Keys12, record: TlsRecord, etm: bool) -> bytes | object:
    """The plaintext of a sequence-0 record, `_BAD_TAG` or `_MALFORMED`."""
    frag = bytes(record.fragment)
    head = struct.pack("!BH", record.content_type & 0xFF, record.version & 0xFFFF)
    try:
        if suite.kind == "gcm":  # RFC 5288 3: 8-byte explicit nonce, 16-byte tag
            if len(frag) < 8 + 16:
                return _MALFORMED
            aad = _SEQ0 + head + struct.pack("!H", len(frag) - 24)
            return AESGCM(keys.key).decrypt(keys.iv + frag[:8], frag[8:], aad)
        if suite.kind == "chacha":  # RFC 7905 2: nonce = IV xor seq (0)
            if len(frag) < 16:
                return _MALFORMED
            aad = _SEQ0 + head + struct.pack("!H", len(frag) - 16)
            return ChaCha20Poly1305(keys.key).decrypt(keys.iv, frag, aad)
    except (InvalidTag, ValueError, OverflowError):
        return _BAD_TAG
    return _decrypt_cbc(suite, keys, frag, head, etm)


def _decrypt_cbc(
    suite: _Suite12,
    keys: _Keys12,
    frag: bytes,
    head: bytes,
    etm: bool,
) -> bytes | object:
    mac_len = _MAC_LEN.get(suite.mac or "")
    if mac_len is None or suite.mac is None:
        return _MALFORMED
    body = frag[:-mac_len] if etm else frag
    # IV and at least one block; MtE: the block(s) must hold the MAC and a padding byte.
    if len(body) < 32 or len(body) % 16 or (not etm and len(body) - 16 < mac_len + 1):
        return _MALFORMED
    if etm:  # RFC 7366 3: the MAC covers IV and ciphertext, and is checked first
        want = KeyedHmac(keys.mac_key, suite.mac)(
            _SEQ0 + head + struct.pack("!H", len(body)) + body)
        if not hmac.compare_digest(want, frag[-mac_len:]):
            return _BAD_TAG
    decryptor = Cipher(algorithms.AES(keys.key), modes.CBC(body[:16])).decryptor()
    plain = decryptor.update(body[16:]) + decryptor.finalize()
    pad = plain[-1]
    end = len(plain) - pad - 1
    if end < (0 if etm else mac_len) or plain[end:-1] != bytes((pad,)) * pad:
        return _BAD_TAG  # RFC 5246 6.2.3.2: bad padding is a bad_record_mac
    if etm:
        return plain[:end]
    content, mac = plain[: end - mac_len], plain[end - mac_len : end]
    want = KeyedHmac(keys.mac_key, suite.mac)(
        _SEQ0 + head + struct.pack("!H", len(content)) + content)
    return content if hmac.compare_digest(want, mac) else _BAD_TAG


def _finished_after_ccs(records: Sequence[TlsRecord], start: int) -> TlsRecord | None:
    """The first record after the first CCS at or after `start`; None if not seen yet."""
    for i in range(start, len(records)):
        if records[i].content_type == CT_CHANGE_CIPHER_SPEC:
            return records[i + 1] if i + 1 < len(records) else None
    return None


def _prove12(
    hello: _ServerHello,
    start: _ServerStart,
    client_random: bytes,
    client_records: Sequence[TlsRecord],
    server_records: Sequence[TlsRecord],
    masters: Sequence[bytes],
    memo: ProofMemo,
) -> list[_Check]:
    suite = _SUITES12.get(hello.cipher_suite)
    if suite is None:
        why = _unchecked(f"TLS 1.2 suite {hello.cipher_suite:#06x} is not checked")
        return [why] * len(masters)
    etm = suite.kind == "cbc" and _EXT_ENCRYPT_THEN_MAC in hello.extensions
    sides = (
        ("client", _finished_after_ccs(client_records, 1)),
        ("server", _finished_after_ccs(server_records, start.next_index)),
    )
    checks = []
    for master in masters:
        key = ("master", "", master)
        check, _ = memo.checks.get(key) or _keep(memo, key, (
            _master_check(suite, master, client_random, hello.random, sides, etm), None))
        checks.append(check)
    return checks


def _master_check(
    suite: _Suite12,
    master: bytes,
    client_random: bytes,
    server_random: bytes,
    sides: tuple[tuple[str, TlsRecord | None], ...],
    etm: bool,
) -> _Check:
    """One master secret against each side's Finished record."""
    keys = dict(
        zip(("client", "server"), _key_block(suite, master, client_random, server_random),
            strict=True)
    )
    verified: list[str] = []
    failed: list[str] = []
    waiting: list[str] = []
    for side, record in sides:
        if not isinstance(record, TlsRecord):
            waiting.append(side)
            continue
        plain = _decrypt12(suite, keys[side], record, etm)
        if plain is _MALFORMED:
            continue
        if plain is _BAD_TAG:
            failed.append(side)
        elif (
            isinstance(plain, bytes)
            and len(plain) >= 16
            and plain[0] == _HS_FINISHED
            and (plain[1] << 16 | plain[2] << 8 | plain[3]) == len(plain) - 4
        ):
            verified.append(side)
        else:
            failed.append(f"{side} (decrypts, but to no Finished)")
    if failed:
        return _Check(Verdict.FAILED, f"Finished fails: {', '.join(failed)}")
    if verified:  # a side still to come may yet refute it: decided only once both are in
        return _Check(Verdict.VERIFIED, f"Finished decrypts: {', '.join(verified)}",
                      pending=bool(waiting))
    if waiting:
        return _unchecked(f"no Finished yet from: {', '.join(waiting)}", pending=True)
    return _unchecked("the Finished records are too short to check")


# --- the whole session --------------------------------------------------------------------------


def _prove(
    client_records: Sequence[TlsRecord],
    server_records: Sequence[TlsRecord],
    lines: Sequence[str],
    memo: ProofMemo,
) -> SessionProof:
    client = memo.client
    if client is None or client.records != len(client_records):
        client = memo.client = _client_start(client_records)
    client_hello = client.hello
    random = client_hello.random if client_hello else None
    parsed = memo.lines.get(key := (tuple(lines), random))
    if parsed is None:
        parsed = memo.lines[key] = _parse_lines(lines, random)
    secrets, ignored = parsed
    start = memo.start or _server_start(server_records)
    if isinstance(start, _ServerStart):
        memo.start = start
    hello = start.hello if isinstance(start, _ServerStart) else None

    checks: dict[str, list[_Check]] = {}
    if client_hello is None:
        waiting = client.waiting
        common = _unchecked("no ClientHello seen" + (" yet" if waiting else ""), pending=waiting)
    elif not isinstance(start, _ServerStart):
        common = start
    elif hello is not None and hello.version == _TLS13:
        common = _unchecked("no TLS 1.3 record is checked under this label")
        checks.update(
            _prove13(hello, start, client_records, client, server_records, secrets, memo)
        )
    elif hello is not None and hello.version == _TLS12:
        common = _unchecked("no TLS 1.2 record is checked under this label")
        if CLIENT_RANDOM in secrets:
            checks[CLIENT_RANDOM] = _prove12(
                hello,
                start,
                client_hello.random,
                client_records,
                server_records,
                secrets[CLIENT_RANDOM],
                memo,
            )
    else:
        version = hello.version if hello is not None else 0
        common = _unchecked(f"protocol version {version:#06x} is not checked")
    if EXPORTER in secrets:
        checks[EXPORTER] = [_unchecked("the exporter secret protects no record")]

    verdicts: dict[str, Verdict] = {}
    details: dict[str, str] = {}
    pending: set[str] = set()
    for label, label_secrets in secrets.items():
        label_checks = checks.get(label) or [common] * len(label_secrets)
        worst = max(label_checks, key=lambda c: _RANK[c.verdict])
        verdicts[label] = worst.verdict
        details[label] = worst.detail
        if worst.verdict is Verdict.UNCHECKED and any(c.pending for c in label_checks):
            pending.add(label)
    return SessionProof(
        secrets=verdicts,
        details=details,
        pending=frozenset(pending),
        version=hello.version if hello is not None else None,
        cipher_suite=hello.cipher_suite if hello is not None else None,
        client_random=random,
        ignored=tuple(ignored),
    )
