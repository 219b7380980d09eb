"""The packet source: bpf/capture.c on clsact, its ring buffer and its per-interface counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from keytap.events import Direction, PacketEvent
from keytap.kernel import abi, ringbuf
from keytap.kernel.loader import compile_program
from keytap.kernel.tc import Hook

HEADER = abi.PACKET_HEADER
HEADER_FIELDS = abi.PACKET_HEADER_FIELDS
BATCH_RECORDS = 4096  # packets per poll: the capture loop writes and reads keys between batches
DIRECTIONS = tuple(Direction)  # by value


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
        defines = abi.capture_defines(snaplen, ring_pages)
        generated = {}
        if packet_filter is not None:
            defines["PACKET_FILTER"] = 1
            generated["packet_filter.h"] = packet_filter
        self._bpf = compile_program("capture.c", defines, generated)
        self._on_packet = on_packet
        self._reader = ringbuf.open_reader(self._bpf, "packets", HEADER,
                                            HEADER_FIELDS.index("cap_len"))
        self.programs = {
            Hook.INGRESS: self._bpf.load_func(b"keytap_ingress", self._bpf.SCHED_CLS).fd,
            Hook.EGRESS: self._bpf.load_func(b"keytap_egress", self._bpf.SCHED_CLS).fd,
        }

    def poll(self, timeout_ms: int) -> None:
        """Deliver a batch of what is in the ring; when it is empty, wait for the classifier's
        wakeup (every WAKEUP_EVERY records) or timeout_ms first."""
        self._reader.wait(timeout_ms)
        self._deliver(self._reader.read(BATCH_RECORDS))

    def drain(self) -> None:
        """Deliver everything still in the ring (after detaching: nothing new comes in)."""
        self._deliver(self._reader.read(None))

    def _deliver(self, records: list[tuple]) -> None:
        on_packet = self._on_packet
        for ktime_ns, ifindex, orig_len, _cap_len, direction, data in records:
            on_packet(PacketEvent(ktime_ns, ifindex, DIRECTIONS[direction], orig_len, data))

    def counters(self) -> dict[tuple[int, Direction], KernelCounters]:
        """Kernel-side counters per (ifindex, direction), summed over CPUs."""
        result = {}
        for key, per_cpu in self._bpf["counters"].items():
            result[(key.ifindex, Direction(key.direction))] = KernelCounters(
                seen=sum(c.seen for c in per_cpu), dropped=sum(c.dropped for c in per_cpu),
                filtered=sum(c.filtered for c in per_cpu))
        return result

    def close(self) -> None:
        self._reader.close()
        self._bpf.cleanup()

