"""The packet source: bpf/capture.c on clsact, its ring buffer and its per-interface counters."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

from keytap.events import Direction, PacketEvent
from keytap.kernel import abi
from keytap.kernel.loader import compile_program, possible_cpus
from keytap.kernel.tc import Hook

HEADER = abi.PACKET_HEADER


@dataclass(frozen=True)
class KernelCounters:
    """What the classifier saw on one interface and direction, and how much of it it lost."""

    seen: int = 0
    dropped: int = 0
    filtered: int = 0


class PacketSource:
    """Compiles and owns the classifier; delivers PacketEvents to `on_packet` while polled."""

    def __init__(self, snaplen: int, ring_bytes: int,
                 on_packet: Callable[[PacketEvent], None], packet_filter: str | None = None
                 ) -> None:
        """`packet_filter`: the C of a filter expression (kernel.pcapfilter.to_c)."""
        ring_pages = 1 << max(ring_bytes // 4096 - 1, 1).bit_length()  # a power of two
        defines = abi.capture_defines(snaplen, ring_pages, possible_cpus())
        generated = {}
        if packet_filter is not None:
            defines["PACKET_FILTER"] = 1
            generated["packet_filter.h"] = packet_filter
        self._bpf = compile_program("capture.c", defines, generated)
        self._on_packet = on_packet
        self._bpf["packets"].open_ring_buffer(self._deliver)
        self.programs = {
            Hook.INGRESS: self._bpf.load_func(b"keytap_ingress", self._bpf.SCHED_CLS).fd,
            Hook.EGRESS: self._bpf.load_func(b"keytap_egress", self._bpf.SCHED_CLS).fd,
        }

    def _deliver(self, _ctx: object, data: int, size: int) -> None:
        raw = ctypes.string_at(data, size)
        ktime_ns, ifindex, orig_len, cap_len, direction = HEADER.unpack_from(raw)
        self._on_packet(PacketEvent(ktime_ns, ifindex, Direction(direction), orig_len,
                                    raw[HEADER.size:HEADER.size + cap_len]))

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for packets, delivering whatever is there. The classifier
        wakes this only every WAKEUP_EVERY records, so what came meanwhile is consumed after
        the wait (libbpf's poll reads only the rings that woke it)."""
        self._bpf.ring_buffer_poll(timeout_ms)
        self._bpf.ring_buffer_consume()

    def drain(self) -> None:
        """Deliver everything still in the ring (after detaching: nothing new comes in)."""
        self._bpf.ring_buffer_consume()

    def counters(self) -> dict[tuple[int, Direction], KernelCounters]:
        """Kernel-side counters per (ifindex, direction), summed over CPUs."""
        result = {}
        for key, per_cpu in self._bpf["counters"].items():
            result[(key.ifindex, Direction(key.direction))] = KernelCounters(
                seen=sum(c.seen for c in per_cpu), dropped=sum(c.dropped for c in per_cpu),
                filtered=sum(c.filtered for c in per_cpu))
        return result

    def close(self) -> None:
        self._bpf.cleanup()
