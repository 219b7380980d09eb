"""A BPF ring buffer read through its own mapping, a bounded batch at a time.

libbpf's ring_buffer__consume(), which BCC wraps, calls back into Python through ctypes for each
record and returns only once the ring is empty: under a load that keeps it from emptying, one
call never returns, and the capture loop neither writes nor reads keys meanwhile. Here the
consumer maps the ring itself (the kernel's layout, kernel/bpf/ringbuf.c: a consumer page, a
producer page, then the data pages mapped twice so that a record that wraps reads as one) and
takes what was committed when the batch began, at most `limit` records: each record's fixed
header unpacked, the bytes after it copied out once (as many as a field of the header says, where
the producer reserves records larger than what it puts in them).

x86-64 only: a record's header is read before its data with plain loads, which x86's memory
order keeps in order (the kernel publishes the header with a release store; libbpf reads it
with an acquire load). Other architectures keep BCC's reader (`BccReader`), which reads the
same records. `open_reader` picks one.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import select
import struct
from typing import Any, Protocol

BUSY_BIT, DISCARD_BIT = 1 << 31, 1 << 30
# Native formats: CPython unpacks those with one load of the field's size ("<Q" goes byte by
# byte, and could read a producer position half-updated).
RECORD_HEADER = struct.Struct("II")  # length (with the two bits above), page offset
POSITION = struct.Struct("Q")
PAGE = mmap.PAGESIZE


def supported() -> bool:
    """Whether plain loads read the ring in the kernel's publication order here."""
    return platform.machine() in ("x86_64", "AMD64")


class Reader(Protocol):
    def wait(self, timeout_ms: int) -> None: ...
    def read(self, limit: int | None) -> list[tuple]: ...
    def close(self) -> None: ...


def open_reader(bpf: Any, name: str, header: struct.Struct,
                length_field: int | None = None) -> Reader:
    """The consumer of a BCC program's ring buffer `name`, whose records are a `header` and
    bytes: its own mapping where `supported`, else BCC's. `length_field`: the index of the
    header field that says how many of the bytes are the record's (None: all of them)."""
    ring = bpf[name]
    if supported():
        return RingReader(ring.map_fd, ring.max_entries, header, length_field)
    return BccReader(bpf, ring, header, length_field)


class RingReader:
    """The consumer of one BPF_MAP_TYPE_RINGBUF map of `size` bytes (a power of two pages) whose
    records are a `header` and bytes (as many as header field `length_field` says)."""

    def __init__(self, map_fd: int, size: int, header: struct.Struct,
                 length_field: int | None = None) -> None:
        self._header = header
        self._length_field = length_field
        self._consumer_page = mmap.mmap(map_fd, PAGE, mmap.MAP_SHARED,
                                        mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        # Stored through ctypes, one 8-byte store: struct.pack_into zero-fills its target
        # before writing, and the kernel, reading a consumer position of 0 meanwhile, took the
        # ring for full and dropped packets.
        self._consumer_position = ctypes.c_uint64.from_buffer(self._consumer_page)
        self._ring = mmap.mmap(map_fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=PAGE)  # the producer page, then the data twice
        self._mask = size - 1
        self._poller = select.poll()
        self._poller.register(map_fd, select.POLLIN)

    def wait(self, timeout_ms: int) -> None:
        """At once when records are waiting; else until the kernel wakes the consumer (the
        producer decides how often) or the timeout passes."""
        self._poller.poll(timeout_ms)

    def read(self, limit: int | None) -> list[tuple]:
        """The records committed before this call, oldest first, at most `limit` (None: all),
        each as (*header fields, bytes); their space is handed back to the kernel."""
        ring, mask = self._ring, self._mask
        unpack_header, header_size = self._header.unpack_from, self._header.size
        length_field = self._length_field
        consumer = self._consumer_position.value
        producer = POSITION.unpack_from(ring)[0]
        records: list[tuple] = []
        take = records.append
        budget = limit if limit is not None else -1
        while consumer < producer and budget != 0:
            at = PAGE + (consumer & mask)
            length = RECORD_HEADER.unpack_from(ring, at)[0]
            if length & BUSY_BIT:
                break  # reserved, not yet committed: it and what follows wait for next time
            size = length & ~(BUSY_BIT | DISCARD_BIT)
            if not length & DISCARD_BIT:
                fields = unpack_header(ring, at + 8)
                start, end = at + 8 + header_size, at + 8 + size
                if length_field is not None and fields[length_field] < end - start:
                    end = start + fields[length_field]
                take((*fields, ring[start:end]))
                budget -= 1
            consumer += (size + 8 + 7) & ~7
        self._consumer_position.value = consumer
        return records

    def close(self) -> None:
        del self._consumer_position  # a buffer exported from the mapping
        self._consumer_page.close()
        self._ring.close()


class BccReader:
    """BCC's ring reader, where RingReader cannot be used: libbpf calls back for each record
    and returns only once the ring is empty (`limit` is not kept)."""

    def __init__(self, bpf: Any, ring: Any, header: struct.Struct,
                 length_field: int | None = None) -> None:
        self._bpf = bpf
        self._header = header
        self._length_field = length_field
        self._records: list[tuple] = []
        ring.open_ring_buffer(self._take)

    def _take(self, _ctx: object, data: int, size: int) -> None:
        fields = self._header.unpack_from(ctypes.string_at(data, self._header.size))
        if self._length_field is not None:
            size = min(size, self._header.size + fields[self._length_field])
        self._records.append((*fields, ctypes.string_at(data + self._header.size,
                                                        size - self._header.size)))

    def wait(self, timeout_ms: int) -> None:
        self._bpf.ring_buffer_poll(timeout_ms)

    def read(self, _limit: int | None) -> list[tuple]:
        self._bpf.ring_buffer_consume()
        records, self._records = self._records, []
        return records

    def close(self) -> None:
        """BCC frees its reader with the program."""
