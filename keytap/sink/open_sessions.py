"""TLS sessions whose packets may continue into the next rotated file, and their secrets.

A rotated file must stand on its own: a session still open at the cut needs its Decryption
Secrets Blocks again in the next file, ahead of its packets there. So, while rotating, the
sink shows this every DSB it writes and every packet: a ClientHello ties its flow to its
client random, FIN from both sides or RST ends the flow. One classification per packet,
paid only when rotating. Bounded: the oldest flows and secrets are forgotten first.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from keytap.merge.tlswire import TCP_FIN, TCP_RST, FlowKey, Kind, classify

MAX_FLOWS = 65_536


class OpenSessions:
    """Flows with a TLS ClientHello and no end yet, and the DSBs of their sessions."""

    def __init__(self, max_flows: int = MAX_FLOWS) -> None:
        self._max = max_flows
        self._flows: OrderedDict[FlowKey, bytes] = OrderedDict()  # flow -> client random
        self._fins: dict[FlowKey, set[bool]] = {}  # sides that sent FIN
        self._secrets: OrderedDict[bytes, list[bytes]] = OrderedDict()  # random -> DSBs
        self._uses: Counter[bytes] = Counter()  # random -> open flows (two paths, NAT)

    def secrets(self, client_random: bytes, block: bytes) -> None:
        """A DSB written for the session of `client_random`."""
        self._secrets.setdefault(client_random, []).append(block)
        self._secrets.move_to_end(client_random)
        while len(self._secrets) > self._max:
            self._secrets.popitem(last=False)

    def packet(self, frame: bytes) -> None:
        """A packet written: follow its flow's start and end."""
        info = classify(frame)
        if info is None:
            return
        if info.kind is Kind.CLIENT_HELLO and info.client_random is not None:
            if info.flow not in self._flows:
                self._flows[info.flow] = info.client_random
                self._uses[info.client_random] += 1
            while len(self._flows) > self._max:
                self._end(next(iter(self._flows)))
            return
        if info.flow not in self._flows:
            return
        if info.tcp_flags & TCP_RST:
            self._end(info.flow)
        elif info.tcp_flags & TCP_FIN:
            sides = self._fins.setdefault(info.flow, set())
            sides.add(info.from_a)
            if len(sides) == 2:
                self._end(info.flow)

    def _end(self, flow: FlowKey) -> None:
        random = self._flows.pop(flow)
        self._fins.pop(flow, None)
        self._uses[random] -= 1
        if self._uses[random] <= 0:
            del self._uses[random]
            self._secrets.pop(random, None)

    def blocks(self) -> list[bytes]:
        """The DSBs of every open session, oldest session first, each block once."""
        randoms = dict.fromkeys(self._flows.values())
        return [block for random in randoms for block in self._secrets.get(random, ())]
