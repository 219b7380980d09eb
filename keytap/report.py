"""The report: the capture's counts, and the summary built from them once, as JSON and as text.

Packet accounting: every packet the classifier saw is written, filtered or counted as dropped. The
summary is one dict (`--summary-json`); the text on stderr is rendered from that dict by the
templates in SUMMARY_TEXT, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from keytap.events import Direction
from keytap.sources.packets import KernelCounters


@dataclass
class InterfaceStats:
    """Counts for one captured interface; `seen == written + dropped + filtered` once the
    capture is over."""

    name: str
    ifindex: int
    seen_in: int = 0
    seen_out: int = 0
    kernel_dropped: int = 0  # ring buffer full or copy failed: never reached user space
    filtered: int = 0  # rejected by the filter expression in the kernel
    discarded: int = 0  # reached user space after the -c limit
    unwritten: int = 0  # reached user space, but the output failed (disk full, reader gone)
    written: int = 0
    written_bytes: int = 0
    lost: str | None = None  # why the interface stopped being captured (deleted...)
    lost_ns: int = 0  # when, wall clock

    @property
    def seen(self) -> int:
        return self.seen_in + self.seen_out

    @property
    def dropped(self) -> int:
        return self.kernel_dropped + self.discarded + self.unwritten

    def update_kernel(self, counters: dict[tuple[int, Direction], KernelCounters]) -> None:
        inbound = counters.get((self.ifindex, Direction.INBOUND), KernelCounters())
        outbound = counters.get((self.ifindex, Direction.OUTBOUND), KernelCounters())
        self.seen_in, self.seen_out = inbound.seen, outbound.seen
        self.kernel_dropped = inbound.dropped + outbound.dropped
        self.filtered = inbound.filtered + outbound.filtered


@dataclass
class CaptureStats:
    interfaces: list[InterfaceStats] = field(default_factory=list)
    start_ns: int = 0  # wall clock
    end_ns: int = 0
    stopped_early: str | None = None  # why the capture ended before it was asked to

    def total(self, attribute: str) -> int:
        return sum(getattr(i, attribute) for i in self.interfaces)

    def status_line(self, tls_sessions: tuple[int, int] | None = None) -> str:
        """The one-line live status shown on a tty; `tls_sessions`: (seen, with keys)."""
        line = (f"{self.total('written')} packets written "
                f"({self.total('written_bytes') / 1e6:.1f} MB), {self.total('dropped')} dropped")
        if tls_sessions is not None:
            line += f"; TLS sessions {tls_sessions[0]}, with keys {tls_sessions[1]}"
        return line

    def as_dict(self) -> dict:
        return {
            "start_ns": self.start_ns, "end_ns": self.end_ns,
            "stopped_early": self.stopped_early,
            "packets": {"seen": self.total("seen"), "written": self.total("written"),
                        "dropped": self.total("dropped"), "filtered": self.total("filtered")},
            "interfaces": [asdict(i) | {"seen": i.seen, "dropped": i.dropped}
                           for i in self.interfaces],
        }


# The text summary: one template per line over the summary dict's "tls" part.
SUMMARY_TEXT = (
    "TLS sessions on the wire: {sessions_seen}, with keys {sessions_with_keys}, without "
    "{sessions_without_keys}; keys after their packets: {keys_after_release} "
    "({sessions_rescued} sessions put ahead of their packets at the end); keys without a "
    "matching ClientHello: {keys_without_client_hello} written; key events dropped: "
    "{keys_unconfirmed} unproven, {keys_rejected} of rejected layouts, {keys_failed} refuted "
    "by their own records; packets held {packets_held}, longest hold {longest_hold_ms:.1f} "
    "ms; {backsteps} packets written older than one before them",
    "TLS: {handshakes} handshakes seen, {key_lines} key-log lines read, {implausible_events} "
    "events dropped as implausible, {secrets_lost_ring_full} lost (ring full), "
    "{quic_reads_skipped} reads of QUIC objects skipped, {tables_rejected} libraries switched "
    "off by the self-check",
    "launch gate: {opens_checked} opens checked, {held} held until their file was inspected "
    "(p50 {held_p50_ms:.1f} ms, p99 {held_p99_ms:.1f} ms, max {held_max_ms:.1f} ms), "
    "{allowed_after_max_hold} let go unanswered after the longest hold, {inspect_errors} "
    "inspections failed",
)


def tls_summary(reorder: Any, keys: Mapping[str, Any] | None) -> dict[str, Any]:
    """The "tls" part of the summary, from the reorder buffer's stats and the key side's."""
    result: dict[str, Any] = {
        "sessions_seen": reorder.tls_sessions_seen,
        "sessions_with_keys": reorder.sessions_with_keys,
        "sessions_without_keys": reorder.sessions_without_keys,
        "flows_without_keys": [str(flow) for flow in reorder.flows_without_keys],
        "keys_without_client_hello": reorder.keys_without_client_hello,
        "keys_unconfirmed": reorder.keys_unconfirmed,
        "keys_after_release": reorder.keys_after_release,
        "keys_rejected": reorder.keys_rejected,
        "keys_failed": reorder.keys_failed,
        "packets_held": reorder.packets_held,
        "longest_hold_ns": reorder.longest_hold_ns,
        "backsteps": reorder.backsteps,
        "proofs_run": reorder.proofs_run,
        "proofs_s": round(reorder.proofs_ns / 1e9, 3),
        "max_backstep_ns": reorder.max_backstep_ns,
        "verification": {kind: {outcome: counts[outcome]
                                for outcome in ("verified", "failed", "unchecked")}
                         for kind, counts in sorted(reorder.verification.items())},
    }
    if keys is not None:
        result |= keys
    return result


def gate_summary(gate: Any) -> dict[str, Any]:
    """The launch gate's part (sources.launches.GateStats): how long new files held their
    openers, in ms."""
    return {"opens_checked": gate.events, "held": gate.candidates,
            "held_p50_ms": round(gate.held_p50_us / 1000, 3),
            "held_p99_ms": round(gate.held_p99_us / 1000, 3),
            "held_max_ms": round(gate.held_max_us / 1000, 3),
            "allowed_after_max_hold": gate.timeouts, "inspect_errors": gate.inspect_errors}


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The text summary, rendered from the summary dict."""
    packets = summary["packets"]
    lines = [f"{packets['seen']} packets seen by the classifier, {packets['written']} written, "
             f"{packets['dropped']} dropped"
             + (f", {packets['filtered']} filtered out" if packets["filtered"] else "")]
    for i in summary["interfaces"]:
        lines.append(f"  {i['name']}: seen {i['seen']} (in {i['seen_in']}, out {i['seen_out']}),"
                     f" written {i['written']},"
                     + (f" filtered {i['filtered']}," if i["filtered"] else "")
                     + f" dropped {i['dropped']} "
                     f"(kernel {i['kernel_dropped']}, after -c {i['discarded']}, "
                     f"output failed {i['unwritten']})"
                     + (f"; lost: {i['lost']}" if i["lost"] else ""))
    if summary.get("stopped_early"):
        lines.append(f"stopped early: {summary['stopped_early']}")
    if "files" in summary:
        names = ["standard output" if name == "-" else name for name in summary["files"]]
        lines.append(f"written to {', '.join(names)}")
    tls = summary.get("tls")
    if tls is None:
        return lines
    values = dict(tls, longest_hold_ms=tls["longest_hold_ns"] / 1e6)
    lines.append(SUMMARY_TEXT[0].format(**values))
    lines += [f"  no keys: {flow}" for flow in tls["flows_without_keys"]]
    for kind, counts in tls["verification"].items():
        lines.append(f"  {kind} sessions: {counts['verified']} verified against their records, "
                     f"{counts['failed']} failed, {counts['unchecked']} could not be checked")
    if "handshakes" in tls:
        lines.append(SUMMARY_TEXT[1].format(**values))
        lines += [f"  {path}: {status}" for path, status in sorted(tls["libraries"].items())]
    if "launch_gate" in tls:
        lines.append(SUMMARY_TEXT[2].format(**tls["launch_gate"]))
    return lines
