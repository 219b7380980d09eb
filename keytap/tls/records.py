"""One TLS record as it crossed the wire, shared by the stream reassembler and the prover.

`keytap.merge.tlsstream` cuts each direction's TCP byte stream into these; `keytap.tls.proof`
checks key-log lines against them. The fragment is kept exactly as sent (ciphertext once the
direction is encrypted): the record header's type, version and length are inputs to every
AEAD/MAC, so nothing here is normalised. A NamedTuple: made for every record of every recorded
connection, cheaper than a dataclass.
"""

from __future__ import annotations

from typing import NamedTuple

CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23


class TlsRecord(NamedTuple):
    """A TLSPlaintext/TLSCiphertext record (RFC 8446 5.1, RFC 5246 6.2) without its length."""

    content_type: int  # 20 CCS, 21 alert, 22 handshake, 23 application_data
    version: int  # the record header's legacy version, e.g. 0x0303
    fragment: bytes  # the record body as on the wire (ciphertext when encrypted)

    @property
    def header(self) -> bytes:
        """The 5-byte record header as on the wire (TLS 1.3's AEAD additional data)."""
        n, v = len(self.fragment), self.version
        return bytes((self.content_type & 0xFF, v >> 8 & 0xFF, v & 0xFF, n >> 8 & 0xFF, n & 0xFF))
