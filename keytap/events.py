"""Events that flow one way: sources -> reorder buffer -> writer.

Every event carries the kernel's CLOCK_MONOTONIC time (`ktime_ns`, what `bpf_ktime_get_ns()`
returns) so that packets from all CPUs and interfaces and key events merge into one order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class Direction(enum.IntEnum):
    """Packet direction as seen by the captured interface; values are pcapng `epb_flags` bits."""

    UNKNOWN = 0
    INBOUND = 1  # TC ingress: the packet arrives on this interface (from the pod, on a host veth)
    OUTBOUND = 2  # TC egress: the packet leaves through this interface


class PacketEvent(NamedTuple):
    """One packet copied by the TC classifier (a NamedTuple: one is made per packet, and it
    costs a third of a frozen dataclass's construction)."""

    ktime_ns: int
    ifindex: int
    direction: Direction
    orig_len: int  # length on the wire (skb->len), may exceed len(data) when snapped
    data: bytes
    comment: str | None = None  # shown by Wireshark; keytap's per-test markers use it
    decrypted_by: tuple[KeyEvent, ...] = ()  # on a TLS session's first packet: whose keys


MARKER_IFINDEX = -1  # markers (e.g. "start test_x") travel as packets of this pseudo interface


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """TLS secrets of one session as NSS key-log lines (SSLKEYLOGFILE format)."""

    ktime_ns: int
    client_random: bytes  # 32 bytes; the session's identity on the wire (ClientHello random)
    lines: tuple[str, ...]  # e.g. "CLIENT_RANDOM <hex random> <hex master secret>"
    slot: int  # the kernel layout slot that read them: the self-check judges slots
    server: bool = False  # read in the server's process (else the client's)
    late: bool = False  # accepted after its flow was written without keys
    pid: int = 0  # the process (tgid) the secrets were read in
    command: str = ""  # its command (comm) then, as the kernel named it

    @property
    def protocol(self) -> str:
        """"1.2" (a master secret) or "1.3" (traffic secrets)."""
        return "1.2" if self.lines[0].startswith("CLIENT_RANDOM ") else "1.3"
