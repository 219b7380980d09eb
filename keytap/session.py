"""A capture session: sources -> reorder buffer -> pcapng writer, from attach to summary.

Single-threaded on purpose: the loop polls the BPF ring buffer(s), whose callbacks push events
into the reorder buffer, then writes what the buffer releases. No locks, and the data flows one
way. Shutdown order matters for the accounting: detach first (nothing new arrives), then drain
the rings, then flush the reorder buffer, then the per-interface statistics blocks.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pyroute2 import IPRoute

from keytap import READY_LINE, __version__
from keytap.clock import monotonic_to_realtime_offset_ns
from keytap.errors import KeytapError
from keytap.events import MARKER_IFINDEX, Direction, KeyEvent, PacketEvent
from keytap.kernel.loader import check_privileges
from keytap.kernel.tc import Hook, InterfaceNotFound, TcAttacher, remove_stale_filters
from keytap.merge.reorder import ReorderBuffer, ReorderConfig
from keytap.report import CaptureStats, InterfaceStats
from keytap.sink.files import check_output_path, open_keylog, open_output
from keytap.sink.pcapng import InterfaceDescription, PcapngWriter
from keytap.sources.keys import KeySource, KeyStats, load_offsets
from keytap.sources.packets import MAX_SNAPLEN, PacketSource
from keytap.tls.discovery import peer_netns_ids

POLL_MS = 20
STATUS_INTERVAL_NS = 500_000_000
LINKTYPE_USER0 = 147  # the markers interface: payload is the marker text
MARKER_SNAPLEN = 4096
REFRESH_INTERVAL_NS = 1_000_000_000  # look for new processes / TLS libraries


@dataclass(frozen=True)
class CaptureOptions:
    interfaces: tuple[str, ...]
    output: str
    count: int | None = None
    duration_s: float | None = None
    snaplen: int = MAX_SNAPLEN
    ring_bytes: int = 64 << 20
    reorder: ReorderConfig = field(default_factory=ReorderConfig)
    tls: bool = True
    all_processes: bool = False
    ssl_libraries: tuple[Path, ...] = ()
    offsets_file: Path | None = None
    keylog_file: str | None = None
    command: tuple[str, ...] = ()  # run this once attached; stop when it exits
    marker_socket: Path | None = None  # AF_UNIX datagrams "<monotonic ns> <text>" -> markers


class Capture:
    """Runs one capture until `should_stop()` says so, -c or --duration is reached."""

    def __init__(self, options: CaptureOptions, should_stop: Callable[[], bool],
                 log: TextIO = sys.stderr) -> None:
        self.options = options
        self._should_stop = should_stop
        self._log = log
        self._reorder = ReorderBuffer(options.reorder)
        self.stats = CaptureStats()
        self._by_ifindex: dict[int, tuple[int, InterfaceStats]] = {}
        self._writer: PcapngWriter | None = None
        self._keylog: TextIO | None = None
        self._marker_position: int | None = None
        self.child: subprocess.Popen | None = None
        self._clock_offset_ns = monotonic_to_realtime_offset_ns()
        self.key_stats: KeyStats | None = None

    def run(self) -> CaptureStats:
        check_privileges()
        with ExitStack() as stack:
            ipr = stack.enter_context(IPRoute())
            self._resolve_interfaces(ipr)
            check_output_path(self.options.output)
            if self.options.command and shutil.which(self.options.command[0]) is None:
                raise KeytapError(f"cannot run {self.options.command[0]}: no such command")
            source = PacketSource(self.options.snaplen, self.options.ring_bytes,
                                  self._reorder.push_packet)
            stack.callback(source.close)
            keys = self._start_key_source(stack) if self.options.tls else None
            for leftover in remove_stale_filters(ipr):
                self._say(f"removed a filter left by a keytap that is gone: {leftover}")
            attacher = TcAttacher(ipr)
            stack.callback(attacher.detach_all)
            for interface in self.stats.interfaces:
                programs = dict(source.programs)
                if attacher.is_loopback(interface.ifindex):
                    del programs[Hook.INGRESS]  # a loopback packet crosses both hooks: once
                attacher.attach(interface.name, programs)
            stream = open_output(self.options.output)
            stack.callback(_close_quietly, stream)
            markers = self._open_marker_socket(stack)
            self._writer = PcapngWriter(stream, self._interface_descriptions(markers),
                                        application=f"keytap {__version__}",
                                        os_name=f"{platform.system()} {platform.release()}")
            self.stats.start_ns = time.time_ns()
            self._log.write(f"{READY_LINE} {', '.join(self.options.interfaces)} -> "
                            f"{self.options.output} (snaplen {self.options.snaplen})\n")
            try:
                if self.options.command:
                    self.child = _start(self.options.command)
                self._loop(source, keys, markers)
                attacher.detach_all()
                source.drain()
                if keys is not None:
                    keys.drain()
                self._write(self._reorder.drain())
                if keys is not None:
                    keys.check_tables(self._reorder.origins)  # reported in the summary
            except BrokenPipeError:
                self._say("output closed by the reader; stopping")
                attacher.detach_all()
            self.stats.end_ns = time.time_ns()
            counters = source.counters()
            for interface in self.stats.interfaces:
                interface.update_kernel(counters)
            self._finish_file()
        return self.stats

    def _resolve_interfaces(self, ipr: IPRoute) -> None:
        if len(set(self.options.interfaces)) != len(self.options.interfaces):
            raise KeytapError("an interface is given twice with -i")
        attacher = TcAttacher(ipr)
        for position, name in enumerate(self.options.interfaces):
            try:
                ifindex = attacher.ifindex(name)
            except InterfaceNotFound:
                raise KeytapError(
                    f"no such interface {name!r}: see `ip link` for the names") from None
            interface = InterfaceStats(name=name, ifindex=ifindex)
            self.stats.interfaces.append(interface)
            self._by_ifindex[ifindex] = (position, interface)

    def _start_key_source(self, stack: ExitStack) -> KeySource:
        """The TLS key source, scoped to the namespaces behind the captured interfaces."""
        scope = None if self.options.all_processes else set().union(
            *(peer_netns_ids(name) for name in self.options.interfaces))
        offsets = load_offsets(self.options.offsets_file)
        if self.options.keylog_file:
            self._keylog = stack.enter_context(open_keylog(self.options.keylog_file))
        keys = KeySource(scope, offsets, self._reorder.push_keys, self.options.ssl_libraries,
                         self._log)
        stack.callback(keys.close)
        self.key_stats = keys.stats
        return keys

    def _interface_descriptions(self, markers: socket.socket | None) -> list[InterfaceDescription]:
        interfaces = [InterfaceDescription(s.name, f"keytap capture on {s.name}",
                                           self.options.snaplen) for s in self.stats.interfaces]
        if markers is not None:
            self._marker_position = len(interfaces)
            interfaces.append(InterfaceDescription(
                "keytap-markers", "markers sent to keytap (see the packet comments)",
                MARKER_SNAPLEN, LINKTYPE_USER0))
        return interfaces

    def _open_marker_socket(self, stack: ExitStack) -> socket.socket | None:
        path = self.options.marker_socket
        if path is None:
            return None
        markers = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        if path.exists() and not path.is_socket():
            raise KeytapError(f"--marker-socket {path} exists and is not a socket: choose a "
                              "new path")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        markers.bind(str(path))
        stack.callback(path.unlink, missing_ok=True)
        path.chmod(0o600)
        markers.setblocking(False)
        return markers

    def _receive_markers(self, markers: socket.socket) -> None:
        """Markers become packets of the markers interface, merged in time order."""
        while True:
            try:
                datagram = markers.recv(MARKER_SNAPLEN)
            except BlockingIOError:
                return
            stamp, _, text = datagram.decode(errors="replace").partition(" ")
            if not stamp.isdigit():
                continue
            data = text.encode()
            self._reorder.push_packet(PacketEvent(int(stamp), MARKER_IFINDEX, Direction.UNKNOWN,
                                                  len(data), data, comment=text))

    def _finished(self) -> bool:
        return self.child is not None and self.child.poll() is not None

    def _loop(self, source: PacketSource, keys: KeySource | None,
              markers: socket.socket | None) -> None:
        started = time.monotonic_ns()
        deadline = (started + int(self.options.duration_s * 1e9)
                    if self.options.duration_s is not None else None)
        next_status = started + STATUS_INTERVAL_NS
        next_refresh = started + REFRESH_INTERVAL_NS
        show_status = self._log.isatty()
        while not self._should_stop():
            source.poll(POLL_MS)
            if markers is not None:
                self._receive_markers(markers)
            now = time.monotonic_ns()
            if keys is not None:
                keys.poll(0)
                if now >= next_refresh:
                    keys.refresh()
                    keys.check_tables(self._reorder.origins)
                    next_refresh = now + REFRESH_INTERVAL_NS
            self._write(self._reorder.pop_ready(now))
            if (self._count_reached() or self._finished()
                    or (deadline is not None and now >= deadline)):
                break
            if show_status and now >= next_status:
                self._log.write(f"\r{self.stats.status_line()}\x1b[K")
                self._log.flush()
                next_status = now + STATUS_INTERVAL_NS
        if show_status:
            self._log.write("\r\x1b[K")

    def _count_reached(self) -> bool:
        return self.options.count is not None and self.stats.total("written") >= self.options.count

    def _write(self, events: list[PacketEvent | KeyEvent]) -> None:
        assert self._writer is not None
        for event in events:
            if isinstance(event, KeyEvent):
                text = "".join(f"{line}\n" for line in event.lines)
                self._writer.write_secrets(text.encode())
                if self._keylog is not None:  # the same lines as the DSBs, confirmed ones only
                    self._keylog.write(text)
                    self._keylog.flush()
                continue
            if event.ifindex == MARKER_IFINDEX:
                self._writer.write_packet(self._marker_position, event.ktime_ns
                                          + self._clock_offset_ns, event.data, event.orig_len,
                                          comment=event.comment)
                continue
            position, interface = self._by_ifindex[event.ifindex]
            if self._count_reached():
                interface.discarded += 1
                continue
            self._writer.write_packet(position, event.ktime_ns + self._clock_offset_ns,
                                      event.data, event.orig_len, event.direction)
            interface.written += 1
            interface.written_bytes += len(event.data)
        self._writer.flush()

    def _finish_file(self) -> None:
        assert self._writer is not None
        with contextlib.suppress(BrokenPipeError):
            for position, interface in enumerate(self.stats.interfaces):
                self._writer.write_statistics(
                    position, self.stats.end_ns, start_ns=self.stats.start_ns,
                    end_ns=self.stats.end_ns, received=interface.seen,
                    dropped=interface.dropped, delivered=interface.written)
            self._writer.flush()

    def summary_lines(self) -> list[str]:
        """The summary printed on stderr at the end: packets, TLS sessions, keys."""
        lines = self.stats.summary_lines()
        held = self._reorder.stats
        lines.append(
            f"TLS sessions on the wire: {held.tls_sessions_seen}, with keys "
            f"{held.sessions_with_keys}, without {held.sessions_without_keys}; keys without a "
            f"matching ClientHello: {held.keys_without_client_hello} written, "
            f"{held.keys_unconfirmed} dropped (table not confirmed); packets held "
            f"{held.packets_held}, longest hold {held.longest_hold_ns / 1e6:.1f} ms")
        lines += [f"  no keys: {flow}" for flow in held.flows_without_keys]
        if self.key_stats is not None:
            lines += self.key_stats.summary_lines()
        return lines

    def summary(self) -> dict:
        """The same as a JSON-ready dict (--summary-json), for CI artifacts."""
        held = self._reorder.stats
        result = self.stats.as_dict()
        result["tls"] = {
            "sessions_seen": held.tls_sessions_seen,
            "sessions_with_keys": held.sessions_with_keys,
            "sessions_without_keys": held.sessions_without_keys,
            "flows_without_keys": [str(flow) for flow in held.flows_without_keys],
            "keys_without_client_hello": held.keys_without_client_hello,
            "keys_unconfirmed": held.keys_unconfirmed,
            "packets_held": held.packets_held,
            "longest_hold_ns": held.longest_hold_ns,
        }
        if self.key_stats is not None:
            result["tls"] |= {"handshakes": self.key_stats.handshakes,
                              "key_lines": self.key_stats.keys_emitted,
                              "implausible_events": self.key_stats.implausible,
                              "secrets_lost_ring_full": self.key_stats.ring_full,
                              "quic_reads_skipped": self.key_stats.quic_skipped,
                              "tables_rejected": self.key_stats.tables_rejected,
                              "libraries": self.key_stats.libraries}
        return result

    def _say(self, message: str) -> None:
        self._log.write(f"keytap: {message}\n")


def _start(command: tuple[str, ...]) -> subprocess.Popen:
    try:
        return subprocess.Popen(command)
    except OSError as error:
        raise KeytapError(f"cannot run {command[0]}: {error.strerror}") from None


def _close_quietly(stream) -> None:
    """Close the output; a reader that went away (`-o - | head`) is not an error here."""
    with contextlib.suppress(BrokenPipeError, OSError):
        stream.close()
