"""kernel.ringbuf on a file laid out as the kernel maps a ring: committed, busy, discarded and
wrapping records, batches bounded by `limit`, and the consumer position handed back; and the
BCC reader other architectures keep."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from keytap.kernel.abi import PACKET_HEADER, PACKET_HEADER_FIELDS
from keytap.kernel.ringbuf import BUSY_BIT, DISCARD_BIT, PAGE, POSITION, BccReader, RingReader

SIZE = 2 * PAGE
HEADER = struct.Struct("<HH")  # a record's own fixed header, as abi.PACKET_HEADER is


class FakeRing:
    """A memfd as the kernel's mapping: consumer page, producer page, the data pages twice."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * SIZE)
        self.producer = 0

    def add(self, fields: tuple[int, int], payload: bytes, flags: int = 0) -> None:
        body = HEADER.pack(*fields) + payload
        record = struct.pack("<II", len(body) | flags, 0) + body
        start = self.producer % SIZE
        for copy in (0, SIZE):  # what the double mapping shows: both halves alike
            os.pwrite(self.fd, record, 2 * PAGE + copy + start)
        if start + len(record) > SIZE:  # wrapped: its tail is also the ring's start
            os.pwrite(self.fd, record[SIZE - start:], 2 * PAGE)
        self.producer += (len(record) + 7) & ~7
        os.pwrite(self.fd, POSITION.pack(self.producer), PAGE)

    def consumer(self) -> int:
        return POSITION.unpack(os.pread(self.fd, 8, 0))[0]


@pytest.fixture
def ring():
    fake = FakeRing()
    yield fake
    os.close(fake.fd)


def test_records_come_in_order_bounded_by_limit(ring: FakeRing) -> None:
    for n in range(5):
        ring.add((n, 7), bytes([n]) * (n + 1))
    reader = RingReader(ring.fd, SIZE, HEADER)
    assert reader.read(3) == [(0, 7, b"\0"), (1, 7, b"\1\1"), (2, 7, b"\2\2\2")]
    assert reader.read(None) == [(3, 7, b"\3" * 4), (4, 7, b"\4" * 5)]
    assert reader.read(None) == [] and ring.consumer() == ring.producer
    reader.close()


def test_a_busy_record_stops_the_batch_and_a_discarded_one_is_skipped(ring: FakeRing) -> None:
    ring.add((1, 0), b"kept")
    ring.add((2, 0), b"discarded", DISCARD_BIT)
    ring.add((3, 0), b"after")
    ring.add((4, 0), b"not committed yet", BUSY_BIT)
    reader = RingReader(ring.fd, SIZE, HEADER)
    assert reader.read(None) == [(1, 0, b"kept"), (3, 0, b"after")]
    assert ring.consumer() < ring.producer  # the busy record is read next time
    reader.close()


def test_a_record_across_the_end_reads_whole(ring: FakeRing) -> None:
    reader = RingReader(ring.fd, SIZE, HEADER)
    filler = SIZE - 64
    ring.add((0, 0), b"x" * (filler - 8 - HEADER.size))
    assert len(reader.read(None)) == 1
    ring.add((9, 9), bytes(range(200)))  # starts 64 bytes before the end
    assert reader.read(None) == [(9, 9, bytes(range(200)))]
    reader.close()


def test_a_record_reserved_larger_than_its_content_gives_only_the_content(
        ring: FakeRing) -> None:
    """bpf/capture.c reserves large packets at the next power of two: the header's length
    field says how many bytes are the packet's, the rest is left over."""
    ring.add((3, 0), b"abc" + b"\xee" * 61)  # (length field, other): 3 bytes of 64
    ring.add((0, 1), b"\xee" * 8)
    ring.add((9, 2), b"short")  # a length beyond the record: the record's own end bounds it
    reader = RingReader(ring.fd, SIZE, HEADER, length_field=0)
    assert reader.read(None) == [(3, 0, b"abc"), (0, 1, b""), (9, 2, b"short")]
    reader.close()


def bcc_reader_of(raw: bytes, length_field: int | None = None) -> BccReader:
    """A BccReader over fake libbpf calls that hand it `raw` as one record at every batch."""
    buffer = ctypes.create_string_buffer(raw, len(raw))

    class Bpf:
        def ring_buffer_poll(self, _timeout_ms: int) -> None:
            pass

        def ring_buffer_consume(self) -> None:
            callback(None, ctypes.addressof(buffer), len(raw))

    class Ring:
        def open_ring_buffer(self, on_record) -> None:
            nonlocal callback
            callback = on_record

    callback = None
    return BccReader(Bpf(), Ring(), PACKET_HEADER, length_field)  # Bpf() keeps `buffer`


def test_bccs_reader_where_the_mapping_is_not_used_gives_the_same_records() -> None:
    """ringbuf.BccReader (other architectures): libbpf's callbacks, as RingReader."""
    reader = bcc_reader_of(PACKET_HEADER.pack(5, 2, 60, 3, 1) + b"abc")
    assert reader.read(1) == [(5, 2, 60, 3, 1, b"abc")]
    assert reader.read(1) == [(5, 2, 60, 3, 1, b"abc")]  # a new batch, the old one not kept


def test_bccs_reader_also_gives_only_the_content_of_a_larger_record() -> None:
    raw = PACKET_HEADER.pack(5, 2, 60, 3, 1) + b"abc" + bytes(4093)
    reader = bcc_reader_of(raw, PACKET_HEADER_FIELDS.index("cap_len"))
    assert reader.read(None) == [(5, 2, 60, 3, 1, b"abc")]
