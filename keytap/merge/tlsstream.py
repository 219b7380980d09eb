"""The first TLS records of one TCP connection, per direction, reassembled from captured frames.

Why: proving a session's secrets means decrypting its first records (the server's first
encrypted handshake record, each side's Finished and first application record), and those
records span TCP segments. Why by hand: a full TCP reassembler (scapy's sessions, or a
tshark pass) is far too slow and too general for "the first few KiB of each direction of a
flow we are holding anyway". Here segments come from the header walk `tlswire.classify` did
already (`tlswire.segment_of`), and the stream is only a bounded bytearray and a list of spans.

Where the streams start. The client's at the ClientHello segment the caller names. The
server's ISN is unknown (holds start at the ClientHello, after the SYN-ACK), so its stream
starts at the first segment it is given whose payload starts with a handshake record carrying a
ServerHello (type 2; a HelloRetryRequest is one too); server segments given before that one are
kept, within the limit, and placed once it comes. (A ServerHello segment at a lower sequence
number given later does not move the start: an HRR and its ServerHello are a round trip apart,
which the capture never reorders.)

What the wire does and what happens to it:
* out of order (a multi-CPU veth delivers so), retransmitted, overlapping segments: bytes go
  into place by sequence number, first copy wins; records are parsed from the contiguous
  prefix only, so a gap stops parsing until something fills it;
* sequence numbers wrap: offsets are taken modulo 2**32, those more than 2**31 behind the start
  are "before the stream" and dropped;
* GSO super-packets (up to 64 KiB, IPv4 tot_len 0): just long segments;
* snapped frames (captured shorter than the IP length): the missing bytes are a gap, never
  invented; `RecordStream.stalled` tells such a gap from one still waiting for a segment;
* garbage (not TLS): parsing stops for good at the first impossible record header (`broken`);
  nothing raises.

Memory: per direction at most `limit_bytes` plus the record that crosses it (before that record's
header is parsed, up to one largest record beyond the limit is kept, out-of-order segments
included); a parsed record's bytes move from the buffer into its TlsRecord, never both.
"""

from __future__ import annotations

import bisect

from keytap.merge.tlswire import (
    MAX_RECORD_LEN,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    FlowKey,
    TcpSegment,
    tcp_segment,
)
from keytap.tls.records import TlsRecord

_SEQ_MASK = 0xFFFFFFFF
_SEQ_HALF = 1 << 31
_HEADER = 5  # content type, legacy version (2), length (2)
_CT_MIN, _CT_MAX = 20, 24  # change_cipher_spec .. heartbeat
_CT_HANDSHAKE = 22
_HS_CLIENT_HELLO = 1
_HS_SERVER_HELLO = 2  # also HelloRetryRequest

Span = tuple[int, int]  # [start, end) in stream offsets


def starts_with_handshake(payload: bytes, hs_type: int) -> bool:
    """Whether payload begins with a plausible handshake record whose first message is hs_type."""
    return (
        len(payload) >= _HEADER + 1
        and payload[0] == _CT_HANDSHAKE
        and payload[1] == 3
        and payload[2] <= 4
        and 0 < ((payload[3] << 8) | payload[4]) <= MAX_RECORD_LEN
        and payload[5] == hs_type
    )


def _add_span(spans: list[Span], start: int, end: int) -> list[Span]:
    """Merge [start, end) into sorted, disjoint, non-touching spans; return its parts not yet in."""
    i = bisect.bisect_left(spans, (start,))
    if i and spans[i - 1][1] >= start:
        i -= 1
    new: list[Span] = []
    cur, lo, hi = start, start, end
    j = i
    while j < len(spans) and spans[j][0] <= end:
        a, b = spans[j]
        if a > cur:
            new.append((cur, a))
        cur = max(cur, b)
        lo, hi = min(lo, a), max(hi, b)
        j += 1
    if cur < end:
        new.append((cur, end))
    spans[i:j] = [(lo, hi)]
    return new


def _clip_spans(spans: list[Span], cap: int) -> None:
    spans[:] = [(a, min(b, cap)) for a, b in spans if a < cap]


class RecordStream:
    """One direction of the connection: its first TLS records, from its start on."""

    __slots__ = (
        "_base",
        "_buf",
        "_cap",
        "_early",
        "_early_bytes",
        "_fin",
        "_have",
        "_hello_type",
        "_limit",
        "_pos",
        "_seen",
        "broken",
        "records",
    )

    def __init__(self, limit: int, hello_type: int) -> None:
        self.records: list[TlsRecord] = []  # complete records, in stream order, from the start
        self.broken = False  # an impossible record header: not TLS (any more); parsing stopped
        self._limit = limit
        self._hello_type = hello_type  # the handshake message a stream may start with
        self._cap = limit + _HEADER + MAX_RECORD_LEN  # stream bytes kept: [0, cap)
        self._base: int | None = None  # sequence number of stream offset 0
        self._pos = 0  # stream offset of the first byte not parsed into a record (= _buf[0])
        self._buf = bytearray()  # stream bytes [pos, pos + len); holes are zeros, see _have
        self._have: list[Span] = []  # captured bytes
        self._seen: list[Span] = []  # bytes known to exist: captured, or cut off by the snaplen
        self._early: list[tuple[int, bytes, int]] = []  # (seq, payload, length) before a start
        self._early_bytes = 0
        self._fin: int | None = None  # where the FIN is: a sequence number until started

    # -- state ---------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """The stream's first sequence number is known."""
        return self._base is not None

    @property
    def contiguous(self) -> int:
        """Bytes of the stream received in order from its start."""
        if self._have and self._have[0][0] == 0:
            return self._have[0][1]
        return 0

    @property
    def complete(self) -> bool:
        """The records reach `limit_bytes`: nothing more is wanted from this direction."""
        return self._pos >= self._limit

    @property
    def stalled(self) -> bool:
        """Parsing waits at bytes that were on the wire but not captured (snapped frame)."""
        if self.broken or self.complete or not self._seen or self._seen[0][0] != 0:
            return False
        return self._seen[0][1] > self.contiguous

    @property
    def pending(self) -> bool:
        """Bytes were seen after a hole no segment has covered yet (or, unstarted: any bytes)."""
        if self.broken or self.complete:
            return False
        if self._base is None:
            return bool(self._early)
        return len(self._seen) > 1 or bool(self._seen and self._seen[0][0] != 0)

    def finished(self, reset: bool) -> bool:
        """Nothing more will come: complete, broken, or closed with nothing missing before the
        FIN (or, after an RST, with no hole pending)."""
        if self.broken or self.complete:
            return True
        if reset:
            return not self.pending
        if self._fin is None:
            return False
        if self._base is None:
            return not self._early  # closed with no ServerHello: finished unless data waits
        end = min(self._fin, self._cap)
        return end <= 0 or bool(self._seen and self._seen[0][0] == 0 and self._seen[0][1] >= end)

    @property
    def buffered(self) -> int:
        """Bytes held that are not (yet) in records."""
        return len(self._buf) + self._early_bytes

    # -- input ---------------------------------------------------------------------------------

    def start(self, seq: int) -> None:
        """Stream offset 0 is at `seq`; place what came before this was known."""
        self._base = seq
        early, self._early, self._early_bytes = self._early, [], 0
        if self._fin is not None:
            self._fin = self._offset(self._fin)
        for s, payload, length in early:
            self._place(s, payload, length)
        self._parse()

    def add(self, seq: int, payload: bytes, length: int, fin: bool) -> bool:
        """A segment: payload (captured) starts at seq, `length` bytes per the IP header.

        Returns whether new records were parsed.
        """
        if self.broken or self.complete:
            return False
        if self._base is None:
            if fin:
                self._fin = (seq + length) & _SEQ_MASK
            if starts_with_handshake(payload, self._hello_type):
                self.start(seq)
                before = len(self.records)
                self._place(seq, payload, length)
                self._parse()
                return len(self.records) > before
            room = self._cap - self._early_bytes
            if length and room > 0:
                kept = payload[:room]
                self._early.append((seq, kept, length))
                self._early_bytes += len(kept)
            return False
        if fin:
            self._fin = self._offset((seq + length) & _SEQ_MASK)
        if not length:
            return False
        before = len(self.records)
        self._place(seq, payload, length)
        self._parse()
        return len(self.records) > before

    def _offset(self, seq: int) -> int:
        assert self._base is not None
        rel = (seq - self._base) & _SEQ_MASK
        return rel - (1 << 32) if rel >= _SEQ_HALF else rel

    def _place(self, seq: int, payload: bytes, length: int) -> None:
        if self.broken or self.complete:
            return  # stopped (while start() placed what came early): nothing more is kept
        rel = self._offset(seq)
        cap = self._cap
        have, seen = self._have, self._seen
        if (len(have) == 1 and have[0] == (0, rel) and seen == have and len(payload) == length
                and rel + length <= cap and len(self._buf) == rel - self._pos):
            # The common case: the next segment in order, whole, after nothing but the stream
            # so far. The general path below gives the same; this skips its span merging.
            have[0] = seen[0] = (0, rel + length)
            self._buf += payload
            return
        seen_start, seen_end = max(rel, 0), min(rel + length, cap)
        if seen_start >= seen_end:
            return
        _add_span(self._seen, seen_start, seen_end)
        have_end = min(rel + min(len(payload), length), cap)
        if seen_start >= have_end:
            return
        pos = self._pos
        buf = self._buf
        view = memoryview(payload)
        for a, b in _add_span(self._have, seen_start, have_end):
            a = max(a, pos)  # bytes before pos are parsed already (and so in _have)
            if a >= b:
                continue
            if len(buf) < b - pos:
                buf.extend(bytes(b - pos - len(buf)))
            buf[a - pos : b - pos] = view[a - rel : b - rel]

    def _parse(self) -> None:
        contiguous = self.contiguous
        buf = self._buf
        while not (self.broken or self.complete) and self._pos + _HEADER <= contiguous:
            ct, major, minor = buf[0], buf[1], buf[2]
            length = (buf[3] << 8) | buf[4]
            if not _CT_MIN <= ct <= _CT_MAX or major != 3 or minor > 4 or length > MAX_RECORD_LEN:
                self._stop(broken=True)
                return
            end = self._pos + _HEADER + length
            if end > self._limit and end < self._cap:
                self._cap = end  # the record crossing the limit is the last one kept
                del buf[end - self._pos :]
                _clip_spans(self._have, end)
                _clip_spans(self._seen, end)
            if end > contiguous:
                break
            fragment = bytes(buf[_HEADER : _HEADER + length])
            self.records.append(TlsRecord(ct, (major << 8) | minor, fragment))
            del buf[: _HEADER + length]
            self._pos = end
        if self.complete:
            self._stop(broken=False)

    def _stop(self, *, broken: bool) -> None:
        self.broken = broken
        self._buf = bytearray()
        self._early, self._early_bytes = [], 0


class ConnectionRecords:
    """Both directions of one TCP connection, from its ClientHello on.

    Feed it frames (Ethernet, as `tlswire.tcp_segment` parses them) or TcpSegments already
    parsed (by `tlswire.tcp_segment`) of the same connection,
    either direction, in any order; frames of other connections and non-TCP frames are ignored.
    """

    __slots__ = ("_reset", "client", "client_from_a", "flow", "server")

    def __init__(self, client_hello: bytes | TcpSegment, limit_bytes: int = 64 * 1024) -> None:
        """client_hello: the segment that carries the start of the ClientHello (its first one,
        after a HelloRetryRequest too). Raises ValueError if it is not a TCP segment."""
        seg = client_hello if isinstance(client_hello, TcpSegment) else tcp_segment(client_hello)
        if seg is None:
            raise ValueError("not a TCP segment: cannot name a connection")
        self.flow: FlowKey = seg.flow
        self.client_from_a: bool = seg.from_a
        self.client = RecordStream(limit_bytes, _HS_CLIENT_HELLO)
        self.server = RecordStream(limit_bytes, _HS_SERVER_HELLO)
        self._reset = False
        start = seg.seq + 1 if seg.flags & TCP_SYN else seg.seq  # TCP Fast Open: data in SYN
        self.client.start(start & _SEQ_MASK)
        self.add(seg)

    @property
    def client_records(self) -> list[TlsRecord]:
        return self.client.records

    @property
    def server_records(self) -> list[TlsRecord]:
        return self.server.records

    def finished(self, client: bool) -> bool:
        """Nothing more will come from that side (see RecordStream.finished)."""
        return (self.client if client else self.server).finished(self._reset)

    @property
    def done(self) -> bool:
        """Nothing more is wanted or will come: each direction is complete (reached the limit),
        not TLS, or closed (FIN, or RST on either side) with nothing pending before the close."""
        return self.client.finished(self._reset) and self.server.finished(self._reset)

    def add(self, frame: bytes | TcpSegment) -> bool:
        """Take one frame; return whether it completed new records (in either direction)."""
        seg = frame if isinstance(frame, TcpSegment) else tcp_segment(frame)
        if seg is None or seg.flow != self.flow:
            return False
        flags = seg.flags
        if flags & TCP_RST:
            self._reset = True
        stream = self.client if seg.from_a == self.client_from_a else self.server
        seq = seg.seq
        if flags & TCP_SYN:
            seq = (seq + 1) & _SEQ_MASK
        return stream.add(seq, seg.payload, seg.length, bool(flags & TCP_FIN))
