"""The sink: events in write order become pcapng blocks (and key-log lines), nothing else.

It owns what turns an event into a block: interface numbering (captured interfaces in -i
order, then the markers interface), the kernel clock's offset to wall time, the -c limit
(packets beyond it are counted as discarded, never written), the --keylog-file copy of the
Decryption Secrets Blocks, and late keys: written as they come, and for a regular file also
put ahead of every packet at the end (sink.rescue).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import BinaryIO, TextIO

from keytap.events import MARKER_IFINDEX, KeyEvent, PacketEvent
from keytap.report import CaptureStats
from keytap.sink.pcapng import InterfaceDescription, PcapngWriter, secrets_block
from keytap.sink.rescue import put_secrets_first
from keytap.sources.markers import MARKER_SNAPLEN

LINKTYPE_USER0 = 147  # the markers interface: payload is the marker text


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

    def __init__(self, stream: BinaryIO, stats: CaptureStats, snaplen: int, markers: bool,
                 count: int | None, keylog: TextIO | None, application: str,
                 os_name: str, rewritable: Path | None = None) -> None:
        """`rewritable`: the output's path when it is a regular file (late keys are then put
        first at the end)."""
        self._stream = stream
        self._stats = stats
        self._rewritable = rewritable
        self._late: list[bytes] = []  # DSBs of keys that came after their packets
        self._rescued: set[bytes] = set()  # their client randoms
        self.rescue_error: str | None = None
        self._count = count
        self._keylog = keylog
        self._clock_offset_ns = monotonic_to_realtime_offset_ns()
        self._positions = {i.ifindex: (p, i) for p, i in enumerate(stats.interfaces)}
        interfaces = [InterfaceDescription(i.name, f"keytap capture on {i.name}", snaplen)
                      for i in stats.interfaces]
        self._marker_position = len(interfaces)
        if markers:
            interfaces.append(InterfaceDescription(
                "keytap-markers", "markers sent to keytap (see the packet comments)",
                MARKER_SNAPLEN, LINKTYPE_USER0))
        self._writer = PcapngWriter(stream, interfaces, application=application,
                                    os_name=os_name)

    def count_reached(self) -> bool:
        return self._count is not None and self._stats.total("written") >= self._count

    def write(self, events: list[PacketEvent | KeyEvent]) -> None:
        writer = self._writer
        for event in events:
            if isinstance(event, KeyEvent):
                text = "".join(f"{line}\n" for line in event.lines)
                writer.write_secrets(text.encode())
                if event.late:
                    self._late.append(secrets_block(text.encode()))
                    self._rescued.add(event.client_random)
                if self._keylog is not None:  # the same lines as the DSBs
                    self._keylog.write(text)
                    self._keylog.flush()
                continue
            timestamp = event.ktime_ns + self._clock_offset_ns
            if event.ifindex == MARKER_IFINDEX:
                writer.write_packet(self._marker_position, timestamp, event.data,
                                    event.orig_len, comment=event.comment)
                continue
            position, interface = self._positions[event.ifindex]
            if self.count_reached():
                interface.discarded += 1
                continue
            writer.write_packet(position, timestamp, event.data, event.orig_len,
                                event.direction)
            interface.written += 1
            interface.written_bytes += len(event.data)
        writer.flush()

    def finish(self) -> None:
        """One interface statistics block per captured interface, with the final counts."""
        stats = self._stats
        with contextlib.suppress(BrokenPipeError):
            for position, interface in enumerate(stats.interfaces):
                self._writer.write_statistics(
                    position, stats.end_ns, start_ns=stats.start_ns, end_ns=stats.end_ns,
                    received=interface.seen, dropped=interface.dropped,
                    delivered=interface.written)
            self._writer.flush()
        if self._rewritable is not None and self._late:
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
