"""The sink: events in write order become pcapng blocks (and key-log lines), nothing else.

It owns what turns an event into a block: interface numbering (captured interfaces in -i
order, then the markers interface), the kernel clock's offset to wall time, the -c limit
(packets beyond it are counted as discarded, never written), the --keylog-file copy of the
Decryption Secrets Blocks, and late keys: written as they come, and for a regular file also
put ahead of every packet at the end (sink.rescue).

With rotation (-C, -G: sink.rotation) it also cuts: each file ends whole (its statistics
blocks count what it holds, its late keys go first, it is renamed into place) before the next
starts with the header, the interfaces still captured, and the secrets of every TLS session
still open (sink.open_sessions). Per file, isb_ifrecv = what that file accounts for (written,
dropped, filtered out), so the files' counts add up to the capture's.

A write that fails (disk full, the reader of `-o -` gone) stops the writing, not the capture's
accounting: `failure` says why, and every packet from then on, and every one whose block did
not reach the file, is counted as not written, so that seen = written + dropped still holds.
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keytap.errors import KeytapError
from keytap.events import MARKER_IFINDEX, KeyEvent, PacketEvent
from keytap.report import CaptureStats, InterfaceStats
from keytap.sink.files import PendingFile, WholeBlocks
from keytap.sink.open_sessions import OpenSessions
from keytap.sink.pcapng import InterfaceDescription, PcapngWriter, secrets_block
from keytap.sink.rescue import put_secrets_first
from keytap.sink.rotation import Rotation
from keytap.sources.markers import MARKER_SNAPLEN

LINKTYPE_USER0 = 147  # the markers interface: payload is the marker text
_EPB_START = struct.Struct("<I4xI12xI")  # block type, interface id, captured length
_BT_EPB = 6


MARKERS = InterfaceDescription("keytap-markers", "markers sent to keytap (see the packet comments)",
                               MARKER_SNAPLEN, LINKTYPE_USER0)


def _description(name: str, snaplen: int) -> InterfaceDescription:
    return InterfaceDescription(name, f"keytap capture on {name}", snaplen)


@dataclass(frozen=True)
class _Counts:
    """An interface's counts when a file started: what earlier files accounted for."""

    accounted: int = 0  # written + dropped + filtered
    dropped: int = 0
    filtered: int = 0
    written: int = 0

    @classmethod
    def of(cls, i: InterfaceStats) -> _Counts:
        return cls(i.written + i.dropped + i.filtered, i.dropped, i.filtered, i.written)


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
    """Writes packets, markers and secrets of one capture into one pcapng stream, or into
    rotated files."""

    def __init__(self, stream: WholeBlocks, stats: CaptureStats, snaplen: int, markers: bool,
                 count: int | None, keylog: WholeBlocks | None, application: str,
                 os_name: str, rewritable: Path | None = None,
                 rotation: Rotation | None = None,
                 refresh_counts: Callable[[], None] = lambda: None,
                 name_talkers: Callable[[tuple[KeyEvent, ...]], str] | None = None) -> None:
        """`rewritable`: the output's path when it is a regular file (late keys are then put
        first at the end). `rotation`: cut files by its rule, `stream` being its first file (a
        PendingFile); `refresh_counts` brings the kernel's counters up to date for a cut;
        `name_talkers` says whose keys decrypt a session, as its first packet's comment."""
        self._stream = stream
        self.failure: OSError | None = None  # what stopped the writing
        self._stats = stats
        self._rewritable = rewritable
        self._late: list[bytes] = []  # DSBs of keys that came after their packets
        self._rescued: set[bytes] = set()  # their client randoms
        self._rescued_now: set[bytes] = set()  # ... of the file being written
        self.rescue_error: str | None = None
        self._count = count
        self._keylog = keylog
        self._clock_offset_ns = monotonic_to_realtime_offset_ns()
        self._snaplen = snaplen
        self._markers = markers
        self._header = (application, os_name)
        self._rotation = rotation
        self._refresh_counts = refresh_counts
        self._name_talkers = name_talkers
        self._open = OpenSessions()  # followed only while rotating
        self.files: list[str] = [rotation.name] if rotation is not None else []
        self.files_done = False  # -W files of -G periods written: packets are discarded now
        self._start(stream, [i for i in stats.interfaces if i.lost is None])

    def _start(self, stream: WholeBlocks, interfaces: list[InterfaceStats]) -> None:
        """A file's header: SHB, the interfaces' IDBs, the markers'."""
        self._stream = stream
        self._ended = False  # closed at a cut, and no next file could be opened
        self._file_start_ns = time.time_ns()
        self._positions = {i.ifindex: (p, i) for p, i in enumerate(interfaces)}
        self._base = {i.ifindex: _Counts.of(i) for i in interfaces}
        descriptions = [_description(i.name, self._snaplen) for i in interfaces]
        self._marker_position = len(descriptions)
        if self._markers:
            descriptions.append(MARKERS)
        application, os_name = self._header
        self._writer = PcapngWriter(stream, descriptions, application=application,
                                    os_name=os_name)

    def add_interface(self, interface: InterfaceStats) -> None:
        """An interface captured from now on (a pod that started later): its IDB first."""
        try:
            self._position(interface)
            self._writer.flush()
        except OSError as error:
            self._failed(error)

    def _position(self, interface: InterfaceStats) -> int:
        """The interface's id in this file, its IDB written now if it has none yet (a new
        one, or a packet of a vanished one after a cut)."""
        known = self._positions.get(interface.ifindex)
        if known is not None:
            return known[0]
        position = self._writer.add_interface(_description(interface.name, self._snaplen))
        self._positions[interface.ifindex] = (position, interface)
        self._base[interface.ifindex] = _Counts.of(interface)
        return position

    def count_reached(self) -> bool:
        """-c packets written, or the -W files of -G periods."""
        return ((self._count is not None and self._stats.total("written") >= self._count)
                or self.files_done)

    def write(self, events: list[PacketEvent | KeyEvent]) -> None:
        """Write the events; after a failed write, count their packets as not written."""
        if self.failure is not None:
            self._not_written(events)
            return
        done = 0  # events handed to the writer, the failing one included
        try:
            rotation = self._rotation
            if rotation is not None and not self.files_done and rotation.expired(time.time()):
                self._cut()
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
            if self._rotation is not None:
                self._open.secrets(event.client_random, secrets_block(text))
            if event.late:
                self._late.append(secrets_block(text))
                self._rescued_now.add(event.client_random)
            if self._keylog is not None:  # the same lines as the DSBs
                self._keylog.write(text)
                self._keylog.flush()
            return
        timestamp = event.ktime_ns + self._clock_offset_ns
        if event.ifindex == MARKER_IFINDEX:
            writer.write_packet(self._marker_position, timestamp, event.data,
                                event.orig_len, comment=event.comment)
            return
        rotation = self._rotation
        if rotation is not None and not self.files_done and writer.packets_written \
                and rotation.full(writer.bytes_written):
            self._cut()  # before the lookup: interface ids are the file's
        try:
            position, interface = self._positions[event.ifindex]
        except KeyError:  # no IDB in this file yet
            position, interface = -1, self._interface(event.ifindex)
        if self.count_reached():
            interface.discarded += 1
            return
        if position < 0:
            position = self._position(interface)
        interface.written += 1  # before the write: its block may be the one that fails
        interface.written_bytes += len(event.data)
        if event.decrypted_by and self._name_talkers is not None:
            self._writer.write_packet(position, timestamp, event.data, event.orig_len,
                                      event.direction, self._name_talkers(event.decrypted_by))
        else:
            self._writer.write_packet(position, timestamp, event.data, event.orig_len,
                                      event.direction)
        if rotation is not None:
            self._open.packet(event.data)

    def _interface(self, ifindex: int) -> InterfaceStats:
        """The stats of an interface, also one this file has no IDB for (yet)."""
        known = self._positions.get(ifindex)
        if known is not None:
            return known[1]
        return next(i for i in reversed(self._stats.interfaces) if i.ifindex == ifindex)

    def _cut(self) -> None:
        """End this file whole and start the next, or stop at -W files of -G periods."""
        assert self._rotation is not None
        name = self._rotation.advance(time.time())
        if name is None:
            self.files_done = True
            return
        self._refresh_counts()
        self._end_file(final=False)
        try:
            stream = PendingFile(name)
        except KeytapError as error:  # its OSError, for the exit code (a full disk: 4)
            cause = error.__context__
            raise cause if isinstance(cause, OSError) else OSError(errno.EIO, str(error)) \
                from None
        if name not in self.files:  # a ring (-W) writes its names again
            self.files.append(name)
        self._start(stream, [i for i in self._stats.interfaces if i.lost is None])
        for block in self._open.blocks():
            self._stream.write(block)

    def _failed(self, error: OSError) -> None:
        """Stop writing; packets whose blocks did not reach the file become not written."""
        self.failure = self.failure or error
        interfaces = dict(self._positions.values())
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
                interface = self._interface(event.ifindex)
                if self.count_reached():
                    interface.discarded += 1
                else:
                    interface.unwritten += 1

    def finish(self) -> None:
        """One interface statistics block per interface of the file, with the final counts
        (also after a full disk: the cut back to the last whole block may have made room)."""
        if self._ended:
            return
        try:
            self._end_file(final=True)
        except OSError as error:
            self._failed(error)

    def _end_file(self, final: bool) -> None:
        """The file's statistics blocks, then its late keys put first; a rotated file is
        closed and renamed into place (the last one by close(), after finish)."""
        stats = self._stats
        end_ns = stats.end_ns if final else time.time_ns()
        for position, interface in self._positions.values():
            base = self._base[interface.ifindex]
            accounted = (interface.seen if final else
                         interface.written + interface.dropped + interface.filtered)
            received = accounted - base.accounted
            ended = min(interface.lost_ns or end_ns, end_ns)  # a vanished one ended then
            self._writer.write_statistics(
                position, ended, start_ns=max(stats.start_ns, self._file_start_ns),
                end_ns=ended, received=received, dropped=interface.dropped - base.dropped,
                delivered=interface.written - base.written,
                filter_accepted=received - (interface.filtered - base.filtered))
        self._writer.flush()
        path = (Path(self._stream.temporary) if isinstance(self._stream, PendingFile)
                else self._rewritable)
        if path is not None and self._late and self.failure is None:
            self._stream.flush()
            try:
                put_secrets_first(path, self._writer.header_size, b"".join(self._late))
                self._rescued |= self._rescued_now
            except OSError as error:
                self.rescue_error = f"{error.strerror or error}"
        self._late, self._rescued_now = [], set()
        if not final:
            self._ended = True
            self._stream.close()

    def close(self) -> None:
        """Close the file being written (a rotated one is renamed into place)."""
        if not self._ended:
            self._stream.close()

    @property
    def sessions_rescued(self) -> int:
        """Sessions whose keys came late and were put ahead of their packets."""
        return len(self._rescued)
