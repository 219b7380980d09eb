"""A capture session: sources -> merge -> sink -> report, wired together and run.

Single-threaded on purpose: the loop polls the BPF ring buffers, whose callbacks push events
into the reorder buffer, then hands what the buffer releases to the capture file. No locks,
and the data flows one way. Shutdown order matters for the accounting: detach first (nothing
new arrives), then drain the rings, then flush the reorder buffer, then the per-interface
statistics blocks.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from pyroute2 import IPRoute

from keytap import READY_LINE, __version__
from keytap.errors import BadInput, KeytapError
from keytap.events import KeyEvent
from keytap.kernel.abi import MAX_SNAPLEN
from keytap.kernel.loader import release_free_heap, restore_fd_limit
from keytap.kernel.peers import peer_netns_ids
from keytap.kernel.tc import (
    Hook,
    InterfaceAttachment,
    InterfaceNotFound,
    TcAttacher,
    remove_stale_filters,
)
from keytap.merge.reorder import ReorderBuffer, ReorderConfig
from keytap.merge.tlswire import classify
from keytap.report import (
    CaptureStats,
    InterfaceStats,
    gate_summary,
    summary_lines,
    tls_summary,
)
from keytap.sink.capture_file import CaptureFile
from keytap.sink.files import STDOUT, PendingFile, open_keylog, open_output
from keytap.sink.rotation import Rotation, RotationRule
from keytap.sources.go_keys import GoKeySource
from keytap.sources.keys import KeySource
from keytap.sources.launches import GateStats, LaunchGate
from keytap.sources.markers import MarkerSource
from keytap.sources.packets import PacketSource
from keytap.sources.processes import Talkers
from keytap.tls.offsets import load_offsets
from keytap.tls.probes import TlsProbes
from keytap.tls.remembered import RememberedLayouts
from keytap.tls.selfcheck import SelfCheck

POLL_MS = 20
STATUS_INTERVAL_NS = 500_000_000
REFRESH_INTERVAL_NS = 1_000_000_000  # look for new processes / TLS libraries
WATCH_INTERVAL_NS = 500_000_000  # is every captured interface still there?
TRIM_INTERVAL_NS = 60_000_000_000  # free heap pages handed back (kernel.loader)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class InterfaceFollower(Protocol):
    """Names interfaces to capture that appear during the capture (--selector's new pods)."""

    def poll(self) -> list[tuple[str, str]]:
        """New (interface, what it belongs to) pairs since the last call; never raises."""
        ...

    def close(self) -> None: ...


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
    packet_filter: str | None = None  # a filter expression as C (kernel.pcapfilter.to_c)
    follow: InterfaceFollower | None = None  # interfaces joining later; the capture outlives
    # all of its interfaces then
    rotation: RotationRule | None = None  # -C, -G, -W: `output` is the file name pattern
    quiet: bool = False  # --quiet: warnings and errors only, no live status


class Capture:
    """Runs one capture until `should_stop()` says so, -c or --duration is reached."""

    def __init__(self, options: CaptureOptions, should_stop: Callable[[], bool],
                 log: TextIO = sys.stderr) -> None:
        self.options = options
        self._should_stop = should_stop
        self._log = log
        self._info: TextIO = _Discard() if options.quiet else log  # what --quiet leaves out
        self.selfcheck = SelfCheck()
        # --no-tls: no frame is TLS to the buffer, so no flow waits for keys that cannot come
        self._reorder = ReorderBuffer(options.reorder, judge=self.selfcheck,
                                      classify_frame=classify if options.tls else _not_tls)
        self.stats = CaptureStats()
        self.child: subprocess.Popen | None = None
        self._probes: TlsProbes | None = None
        self._keys: KeySource | None = None
        self._go_keys: GoKeySource | None = None
        self._talkers: Talkers | None = None
        self._sink: CaptureFile | None = None
        self._gate: LaunchGate | None = None
        self._gate_stats: GateStats | None = None
        self._start_cpu_s: float | None = None  # keytap's CPU time when capturing began
        self._gate_roots: set[Path] = set()
        self._attachments: dict[int, InterfaceAttachment] = {}  # by ifindex

    def run(self) -> CaptureStats:
        with ExitStack() as stack:
            ipr = stack.enter_context(IPRoute())
            self._resolve_interfaces(ipr)
            packets = PacketSource(self.options.snaplen, self.options.ring_bytes,
                                   self._reorder.push_packet, self.options.packet_filter)
            stack.callback(packets.close)
            keylog = self._start_tls(stack) if self.options.tls else None
            release_free_heap()
            # What exists now (BCC's, the imports') lives as long as the capture: the collector
            # skips it from here on, so a full collection no longer holds the GIL ~15 ms, which
            # the capture loop and a task the launch gate holds would wait for.
            gc.freeze()
            for leftover in remove_stale_filters(ipr):
                self._say(f"removed a filter left by a keytap that is gone: {leftover}")
            attacher = self._attach(stack, ipr, packets)
            rule = self.options.rotation
            rotation = Rotation(rule, time.time()) if rule is not None else None
            stream = (PendingFile(rotation.name) if rotation is not None
                      else open_output(self.options.output))
            stack.callback(_close_quietly, stream)
            markers = None
            if self.options.marker_socket is not None:
                markers = MarkerSource(self.options.marker_socket, self._reorder.push_packet)
                stack.callback(markers.close)
            sink = CaptureFile(stream, self.stats, self.options.snaplen, markers is not None,
                               self.options.count, keylog, application=f"keytap {__version__}",
                               os_name=f"{platform.system()} {platform.release()}",
                               rewritable=regular_file(self.options.output),
                               rotation=rotation,
                               refresh_counts=lambda: self._update_counts(packets),
                               name_talkers=self._talkers.comment if self._talkers else None)
            self._sink = sink
            if rotation is not None:
                stack.callback(_close_quietly, sink)  # the last file, renamed into place
            if self.options.follow is not None:
                stack.callback(self.options.follow.close)
            self.stats.start_ns = time.time_ns()
            self._start_cpu_s = _own_cpu_s()
            watched = ", ".join(self.options.interfaces) or "(none yet)"
            self._info.write(f"{READY_LINE} {watched} -> {self.options.output} "
                             f"(snaplen {self.options.snaplen})\n")
            if self.options.command:
                self.child = _start(self.options.command)
            self._loop(packets, markers, sink, attacher)
            attacher.detach_all()
            packets.drain()
            if markers is not None:
                markers.poll()  # one sent just before the stop (a test's "end" marker)
            if self._keys is not None:
                self._keys.drain()
            if self._go_keys is not None:
                self._go_keys.drain()  # with the Go sessions still gathering their lines
            sink.write(self._reorder.drain())  # after a failed write: counted, not written
            if self._probes is not None:
                self._probes.check()  # reported in the summary
            self.stats.end_ns = time.time_ns()
            self._update_counts(packets)
            sink.finish()
            if sink.files_done and rule is not None:
                self._note(f"-W {rule.count}: that many files of {rule.seconds:g} s written, "
                          "stopped")
            if sink.failure is not None:
                self.stats.stopped_early = output_failure(sink.failure)
                self._say(f"stopped early: {self.stats.stopped_early}")
            if sink.rescue_error is not None:
                self._say(f"could not put late keys ahead of their packets in "
                          f"{self.options.output} ({sink.rescue_error}); they follow them")
        return self.stats

    def _update_counts(self, packets: PacketSource) -> None:
        """The kernel's per-interface counters into the stats (at the end, and at a cut)."""
        counters = packets.counters()
        for interface in self.stats.interfaces:
            interface.update_kernel(counters)

    def _attach(self, stack: ExitStack, ipr: IPRoute, packets: PacketSource) -> TcAttacher:
        """The classifier on every interface: tcx first in the chain, or clsact filters (where
        a filter ahead of keytap's can hide packets from it: said loudly)."""
        attacher = TcAttacher(ipr, use_tcx=os.environ.get("KEYTAP_ATTACH") != "clsact")
        stack.callback(attacher.close)
        for interface in self.stats.interfaces:
            programs = dict(packets.programs)
            if attacher.is_loopback(interface.ifindex):
                del programs[Hook.INGRESS]  # a loopback packet crosses both hooks: once
            attachment = attacher.attach(interface.name, programs)
            self._attachments[interface.ifindex] = attachment
            for f in attachment.behind:
                self._say(f"WARNING: {interface.name} {f.hook.name.lower()}: a {f.kind} filter "
                          f"at prio {f.prio} runs before keytap's and can end classification: "
                          "packets it classifies are not captured (remove it or use a kernel "
                          "with tcx, 6.6+)")
        if not attacher.use_tcx:
            self._note("attached through clsact filters (no tcx on this kernel, or "
                      "KEYTAP_ATTACH=clsact)")
        return attacher

    def _watch_interfaces(self, attacher: TcAttacher) -> None:
        """An interface that vanished (pod deleted) or whose filters went is reported and
        detached; the capture goes on with the others, and stops when none is left."""
        for interface in self.stats.interfaces:
            attachment = self._attachments.get(interface.ifindex)
            if attachment is None or interface.lost is not None:
                continue
            reason = attacher.lost(attachment)
            if reason is None:
                continue
            interface.lost, interface.lost_ns = reason, time.time_ns()
            attacher.detach(attachment)
            left = [i.name for i in self.stats.interfaces if i.lost is None]
            self._say(f"{interface.name}: {reason}; "
                      + (f"capturing {', '.join(left)}" if left else "nothing left to capture"))
        if self.options.follow is None and all(i.lost is not None for i in self.stats.interfaces):
            self.stats.stopped_early = "every captured interface vanished"

    def _follow(self, follow: InterfaceFollower, attacher: TcAttacher, packets: PacketSource,
                sink: CaptureFile) -> None:
        """Interfaces that appeared (a matching pod started): attached, given their IDB, and
        the namespace behind each joins the key scope."""
        for name, owner in follow.poll():
            try:
                ifindex = attacher.ifindex(name)
                scope = peer_netns_ids(name)
            except LookupError:
                continue  # gone already: its pod was deleted as it started
            if any(i.ifindex == ifindex and i.lost is None for i in self.stats.interfaces):
                continue
            interface = InterfaceStats(name=name, ifindex=ifindex)
            self.stats.interfaces.append(interface)
            self._attachments[ifindex] = attacher.attach(name, dict(packets.programs))
            sink.add_interface(interface)
            if self._probes is not None and not self.options.all_processes:
                for source in (self._keys, self._go_keys, self._probes):
                    if source is not None:
                        source.widen_scope(scope)
            self._note(f"{owner}: capturing {name}")

    def _resolve_interfaces(self, ipr: IPRoute) -> None:
        if len(set(self.options.interfaces)) != len(self.options.interfaces):
            raise KeytapError("an interface is given twice with -i")
        attacher = TcAttacher(ipr)
        for name in self.options.interfaces:
            try:
                ifindex = attacher.ifindex(name)
            except InterfaceNotFound:
                raise BadInput(
                    f"no such interface {name!r}: see `ip link` for the names") from None
            self.stats.interfaces.append(InterfaceStats(name=name, ifindex=ifindex))

    def _start_tls(self, stack: ExitStack) -> TextIO | None:
        """The key source and its probes, scoped to the namespaces behind the interfaces;
        returns the --keylog-file, if any."""
        scope = None if self.options.all_processes else set().union(
            *(peer_netns_ids(name) for name in self.options.interfaces))
        table = load_offsets(self.options.offsets_file)
        keylog = (stack.enter_context(open_keylog(self.options.keylog_file))
                  if self.options.keylog_file else None)
        self._keys = KeySource(scope, self._keys_arrived)
        stack.callback(self._keys.close)
        self._go_keys = GoKeySource(scope, self._keys_arrived)
        stack.callback(self._go_keys.close)
        self._probes = TlsProbes(scope, table, self._keys, self.selfcheck, self._info,
                                 RememberedLayouts(), self._go_keys, frozenset({os.getpid()}))
        self._talkers = Talkers(self._probes.library_of)
        self._probes.add_libraries(self.options.ssl_libraries)
        self._probes.refresh()
        self._gate = self._start_gate(self._probes)
        if self._gate is not None:
            stack.callback(self._close_gate)  # before the key source goes (callbacks: LIFO)
        return keylog

    def _keys_arrived(self, keys: KeyEvent) -> None:
        """Their process is looked at now (it may be gone when its packets are written)."""
        assert self._talkers is not None
        self._talkers.note(keys)
        self._reorder.push_keys(keys)

    def _start_gate(self, probes: TlsProbes) -> LaunchGate | None:
        """Holds in-scope processes opening a file keytap has not inspected until it has, so
        that one started later is probed before its first handshake. Without fanotify
        permission events keytap still works, with its once-a-second rescan only."""
        try:
            gate = LaunchGate((), lambda opened: probes.inspect_opened(opened.fd, opened.name),
                              probes.in_scope)
        except KeytapError as error:
            self._say(f"{error}; processes started later are found by a rescan every second, "
                      "so their first handshakes may have no keys")
            return None
        self._watch_new_roots(gate, probes)  # one root it cannot watch is said, not fatal
        return gate

    def _close_gate(self) -> None:
        """Its waits are kept for the summary: only the live helper can tell them."""
        assert self._gate is not None
        self._gate_stats = self._gate.stats()
        self._gate.close()

    @property
    def output_error(self) -> OSError | None:
        """What stopped the writing of the output or the key log, if anything did."""
        return self._sink.failure if self._sink is not None else None

    def _finished(self) -> bool:
        return self.child is not None and self.child.poll() is not None

    def _loop(self, packets: PacketSource, markers: MarkerSource | None,
              sink: CaptureFile, attacher: TcAttacher) -> None:
        started = time.monotonic_ns()
        deadline = (started + int(self.options.duration_s * 1e9)
                    if self.options.duration_s is not None else None)
        next_status = started + STATUS_INTERVAL_NS
        next_watch = started + WATCH_INTERVAL_NS
        next_refresh = started + REFRESH_INTERVAL_NS
        next_trim = started + TRIM_INTERVAL_NS
        show_status = not self.options.quiet and self._log.isatty()
        while not self._should_stop():
            packets.poll(POLL_MS)
            if markers is not None:
                markers.poll()
            now = time.monotonic_ns()
            if self._keys is not None and self._probes is not None:
                self._keys.poll()
                if self._go_keys is not None:
                    self._go_keys.poll()
                if now >= next_refresh:
                    self._probes.refresh()
                    self._probes.check()
                    if self._gate is not None:
                        self._watch_new_roots(self._gate, self._probes)
                    next_refresh = now + REFRESH_INTERVAL_NS
            if now >= next_trim:
                release_free_heap()
                next_trim = now + TRIM_INTERVAL_NS
            if now >= next_watch:
                self._watch_interfaces(attacher)
                if self.options.follow is not None:
                    self._follow(self.options.follow, attacher, packets, sink)
                next_watch = now + WATCH_INTERVAL_NS
            sink.write(self._reorder.pop_ready(now))
            if (sink.count_reached() or self._finished() or sink.failure is not None
                    or self.stats.stopped_early is not None
                    or (deadline is not None and now >= deadline)):
                break
            if show_status and now >= next_status:
                reorder = self._reorder.stats
                tls = ((reorder.tls_sessions_seen, reorder.sessions_with_keys)
                       if self.options.tls else None)
                self._log.write(f"\r{self.stats.status_line(tls)}\x1b[K")
                self._log.flush()
                next_status = now + STATUS_INTERVAL_NS
        if show_status:
            self._log.write("\r\x1b[K")

    def _watch_new_roots(self, gate: LaunchGate, probes: TlsProbes) -> None:
        for root in probes.roots - self._gate_roots:
            self._gate_roots.add(root)
            try:
                gate.add_root(root)
            except KeytapError as error:
                self._say(f"{error}; its processes' new libraries are found by the rescan "
                          "every second")

    def summary(self) -> dict[str, Any]:
        """The end-of-capture summary (--summary-json; the text one is rendered from it)."""
        result = self.stats.as_dict()
        result["cpu_s"] = round(_own_cpu_s(), 3)  # keytap's own, so far
        if self._start_cpu_s is not None:  # of which the start, up to "capturing"
            result["start_cpu_s"] = round(self._start_cpu_s, 3)
        keys = self._probes.summary() if self._probes is not None else None
        rescued = self._sink.sessions_rescued if self._sink is not None else 0
        result["tls"] = tls_summary(self._reorder.stats, keys) | {"sessions_rescued": rescued}
        result["files"] = (self._sink.files if self._sink is not None and self._sink.files
                           else [self.options.output])
        gate = self._gate_stats or (self._gate.stats() if self._gate is not None else None)
        if gate is not None:
            result["tls"]["launch_gate"] = gate_summary(gate)
        return result

    def summary_lines(self) -> list[str]:
        return summary_lines(self.summary())

    def _say(self, message: str) -> None:
        self._log.write(f"keytap: {message}\n")

    def _note(self, message: str) -> None:
        """What is going on, as opposed to what went wrong: left out with --quiet."""
        self._info.write(f"keytap: {message}\n")


class _Discard(io.TextIOBase):
    """Where --quiet sends what it leaves out."""

    def write(self, text: str) -> int:
        return len(text)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _not_tls(_frame: bytes) -> None:
    return None


def output_failure(error: OSError) -> str:
    """Why writing stopped, as the summary says it."""
    if error.errno == errno.EPIPE:
        return "output closed by the reader"
    if error.errno in DISK_FULL:
        return f"disk full ({error.strerror}); the file ends at its last whole block"
    return f"cannot write the output: {error.strerror}"


def regular_file(output: str) -> Path | None:
    """The output's path if it is a regular file (not `-`, a FIFO or a device)."""
    if output == STDOUT:
        return None
    path = Path(output)
    return path if path.is_file() else None


def _start(command: tuple[str, ...]) -> subprocess.Popen:
    try:  # between fork and exec only setrlimit runs: no lock another thread could hold
        return subprocess.Popen(command, preexec_fn=restore_fd_limit)
    except OSError as error:
        raise KeytapError(f"cannot run {command[0]}: {error.strerror}") from None


def _close_quietly(stream) -> None:
    """Close the output; a reader that went away (`-o - | head`) is not an error here."""
    with contextlib.suppress(BrokenPipeError, OSError):
        stream.close()
