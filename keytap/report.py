"""Packet accounting: every packet the classifier saw is written or counted as dropped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from keytap.events import Direction
from keytap.sources.packets import KernelCounters


@dataclass
class InterfaceStats:
    """Counts for one captured interface; `seen == written + dropped` once the capture is over."""

    name: str
    ifindex: int
    seen_in: int = 0
    seen_out: int = 0
    kernel_dropped: int = 0  # ring buffer full or copy failed: never reached user space
    discarded: int = 0  # reached user space after the -c limit
    written: int = 0
    written_bytes: int = 0

    @property
    def seen(self) -> int:
        return self.seen_in + self.seen_out

    @property
    def dropped(self) -> int:
        return self.kernel_dropped + self.discarded

    def update_kernel(self, counters: dict[tuple[int, Direction], KernelCounters]) -> None:
        inbound = counters.get((self.ifindex, Direction.INBOUND), KernelCounters())
        outbound = counters.get((self.ifindex, Direction.OUTBOUND), KernelCounters())
        self.seen_in, self.seen_out = inbound.seen, outbound.seen
        self.kernel_dropped = inbound.dropped + outbound.dropped


@dataclass
class CaptureStats:
    interfaces: list[InterfaceStats] = field(default_factory=list)
    start_ns: int = 0  # wall clock
    end_ns: int = 0

    def total(self, attribute: str) -> int:
        return sum(getattr(i, attribute) for i in self.interfaces)

    def status_line(self) -> str:
        """The one-line live status shown on a tty."""
        return (f"{self.total('written')} packets written "
                f"({self.total('written_bytes') / 1e6:.1f} MB), {self.total('dropped')} dropped")

    def summary_lines(self) -> list[str]:
        lines = [f"{self.total('seen')} packets seen by the classifier, "
                 f"{self.total('written')} written, {self.total('dropped')} dropped"]
        for i in self.interfaces:
            lines.append(
                f"  {i.name}: seen {i.seen} (in {i.seen_in}, out {i.seen_out}), "
                f"written {i.written}, dropped {i.dropped} "
                f"(kernel {i.kernel_dropped}, after -c {i.discarded})")
        return lines

    def as_dict(self) -> dict:
        return {
            "start_ns": self.start_ns, "end_ns": self.end_ns,
            "packets": {"seen": self.total("seen"), "written": self.total("written"),
                        "dropped": self.total("dropped")},
            "interfaces": [asdict(i) | {"seen": i.seen, "dropped": i.dropped}
                           for i in self.interfaces],
        }
