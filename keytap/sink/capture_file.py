"""The sink: events in write order become pcapng blocks (and key-log lines), nothing else.

It owns what turns an event into a block: interface numbering (captured interfaces in -i
order, then the markers interface), the kernel clock's offset to wall time, the -c limit
(packets beyond it are counted as discarded, never written), the --keylog-file copy of the
Decryption Secrets Blocks, and late keys: written as they come, and for a regular file also
put ahead of every packet at the end (sink.rescue).

A write that fails (disk full, the reader of `-o -` gone) stops the writing, not the capture's
accounting: `failure` says why, and every packet from then on, and every one whose block did
not reach the file, is counted as not written, so that seen = written + dropped still holds.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from keytap.events import MARKER_IFINDEX, KeyEvent, PacketEvent
from keytap.report import CaptureStats, InterfaceStats
from keytap.sink.files import WholeBlocks
from keytap.sink.pcapng import InterfaceDescription, PcapngWriter, secrets_block
from keytap.sink.rescue import put_secrets_first
from keytap.sources.markers import MARKER_SNAPLEN

LINKTYPE_USER0 = 147  # the markers interface: payload is the marker text
_EPB_START = struct.Struct("<I4xI12xI")  # block type, interface id, captured length
_BT_EPB = 6


def _description(name: str, snaplen: int) -> InterfaceDescription:
    return InterfaceDescription(name, f"keytap capture on {name}", snaplen)


def monotonic_to_realtime_offset_ns(samples: int = 5) -> int:
    """REALTIME - MONOTONIC (the kernel stamps packets with ktime), from the tightest of a few
    back-to-back readings."""
    best_width, best_offset = None, 0
    for _ in range(samples):
        before = time.monotonic_ns()
        realtime = time.time_ns()
        after = time.monotonic_ns()
        if best_width is None or after - before < best_width:
            best_width, best_offset = after - before, realtime - (before + after) // 2
    return best_offset


class CaptureFile:
    """Writes packets, markers and secrets of one capture into one pcapng stream."""

    def __init__(self, stream: WholeBlocks, stats: CaptureStats, snaplen: int, markers: bool,
                 count: int | None, keylog: WholeBlocks | None, application: str,
                 os_name: str, rewritable: Path | None = None) -> None:
        """`rewritable`: the output's path when it is a regular file (late keys are then put
        first at the end)."""
        self._stream = stream
        self.failure: OSError | None = None  # what stopped the writing
        self._stats = stats
        self._rewritable = rewritable
        self._late: list[bytes] = []  # DSBs of keys that came after their packets
        self._rescued: set[bytes] = set()  # their client randoms
        self.rescue_error: str | None = None
        self._count = count
        self._keylog = keylog
        self._clock_offset_ns = monotonic_to_realtime_offset_ns()
        self._snaplen = snaplen
        self._positions = {i.ifindex: (p, i) for p, i in enumerate(stats.interfaces)}
        interfaces = [_description(i.name, snaplen) for i in stats.interfaces]
        self._marker_position = len(interfaces)
        if markers:
            interfaces.append(InterfaceDescription(
                "keytap-markers", "markers sent to keytap (see the packet comments)",
                MARKER_SNAPLEN, LINKTYPE_USER0))
        self._writer = PcapngWriter(stream, interfaces, application=application,
                                    os_name=os_name)

    def add_interface(self, interface: InterfaceStats) -> None:
        """An interface captured from now on (a pod that started later): its IDB first."""
        try:
            position = self._writer.add_interface(_description(interface.name, self._snaplen))
            self._writer.flush()
        except OSError as error:
            self._failed(error)
            return
        self._positions[interface.ifindex] = (position, interface)

    def count_reached(self) -> bool:
        return self._count is not None and self._stats.total("written") >= self._count

    def write(self, events: list[PacketEvent | KeyEvent]) -> None:
        """Write the events; after a failed write, count their packets as not written."""
        if self.failure is not None:
            self._not_written(events)
            return
        done = 0  # events handed to the writer, the failing one included
        try:
            while done < len(events):
                done += 1
                self._write_event(events[done - 1])
            self._writer.flush()
        except OSError as error:
            self._failed(error)
            self._not_written(events[done:])

    def _write_event(self, event: PacketEvent | KeyEvent) -> None:
        writer = self._writer
        if isinstance(event, KeyEvent):
            text = "".join(f"{line}\n" for line in event.lines).encode()
            writer.write_secrets(text)
            if event.late:
                self._late.append(secrets_block(text))
                self._rescued.add(event.client_random)
            if self._keylog is not None:  # the same lines as the DSBs
                self._keylog.write(text)
                self._keylog.flush()
            return
        timestamp = event.ktime_ns + self._clock_offset_ns
        if event.ifindex == MARKER_IFINDEX:
            writer.write_packet(self._marker_position, timestamp, event.data,
                                event.orig_len, comment=event.comment)
            return
        position, interface = self._positions[event.ifindex]
        if self.count_reached():
            interface.discarded += 1
            return
        interface.written += 1  # before the write: its block may be the one that fails
        interface.written_bytes += len(event.data)
        writer.write_packet(position, timestamp, event.data, event.orig_len, event.direction)

    def _failed(self, error: OSError) -> None:
        """Stop writing; packets whose blocks did not reach the file become not written."""
        self.failure = self.failure or error
        interfaces = {position: interface for position, interface in self._positions.values()}
        for block in self._stream.unwritten:
            block_type, position, caplen = _EPB_START.unpack_from(block)
            if block_type == _BT_EPB and position in interfaces:  # not a marker
                interfaces[position].written -= 1
                interfaces[position].written_bytes -= caplen
                interfaces[position].unwritten += 1
        self._stream.unwritten.clear()

    def _not_written(self, events: list[PacketEvent | KeyEvent]) -> None:
        for event in events:
            if isinstance(event, PacketEvent) and event.ifindex != MARKER_IFINDEX:
                _position, interface = self._positions[event.ifindex]
                if self.count_reached():
                    interface.discarded += 1
                else:
                    interface.unwritten += 1

    def finish(self) -> None:
        """One interface statistics block per captured interface, with the final counts (also
        after a full disk: the cut back to the last whole block may have made room)."""
        stats = self._stats
        try:
            for position, interface in self._positions.values():
                end_ns = interface.lost_ns or stats.end_ns  # a vanished one ended then
                self._writer.write_statistics(
                    position, end_ns, start_ns=stats.start_ns, end_ns=end_ns,
                    received=interface.seen, dropped=interface.dropped,
                    delivered=interface.written,
                    filter_accepted=interface.seen - interface.filtered)
            self._writer.flush()
        except OSError as error:
            self._failed(error)
        if self._rewritable is not None and self._late and self.failure is None:
            self._stream.flush()
            try:
                put_secrets_first(self._rewritable, self._writer.header_size,
                                  b"".join(self._late))
            except OSError as error:
                self.rescue_error = f"{error.strerror or error}"

    @property
    def sessions_rescued(self) -> int:
        """Sessions whose keys came late and were put ahead of their packets."""
        if self._rewritable is None or self.rescue_error is not None:
            return 0
        return len(self._rescued)
