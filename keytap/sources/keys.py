"""The key source: bpf/tls.c compiled, its layout slots and program groups, its events decoded.

Mechanism only: which libraries to probe, with which layouts, and what to say about them is
tls.probes' business. A library gets a program group (its uprobes); a group reads with the
layouts of up to CANDIDATES slots at once. A slot is written once and later only switched
off, so every KeyEvent's slot names exactly one layout.
"""

from __future__ import annotations

import ctypes
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from keytap.errors import KeytapError
from keytap.events import KeyEvent
from keytap.kernel import abi, ringbuf, uprobes
from keytap.kernel.btf import kernel_facts
from keytap.kernel.loader import (
    allow_many_probes,
    compile_program,
    ensure_tracefs,
)
from keytap.kernel.probe_site import cheap_site
from keytap.tls.keylog import Tls12Secrets, Tls13Secrets, keylog_lines
from keytap.tls.libraries import TlsLibrary
from keytap.tls.offsets import Layout

TLS1_3_VERSION = 0x0304
CONNECTIONS_REMEMBERED = 16_384
CONNECTION_MEMORY_NS = 60_000_000_000  # candidate slots read a connection within ms


@dataclass
class KernelKeyCounts:
    """What the kernel and the decoder counted for one slot."""

    plausible: int = 0  # events that passed every check
    implausible: int = 0  # reads dropped by a sanity check, in the kernel or here
    ring_full: int = 0  # secrets the kernel could not hand over
    not_tls: int = 0  # reads of QUIC objects (and their inner TLS layer), never secrets
    by_protocol: dict[str, tuple[int, int]] = field(default_factory=dict)  # "1.3" ->
    # (plausible, implausible) of the events the decoder saw; the kernel's implausible
    # reads have no protocol (the version itself was out of range)


class KeySource:
    """Owns bpf/tls.c; delivers KeyEvents to `on_keys` while polled."""

    def __init__(self, scope_netns: set[int] | None,
                 on_keys: Callable[[KeyEvent], None]) -> None:
        self._on_keys = on_keys
        self.handshakes = 0  # connections whose secrets came (whatever slots read them)
        self.key_lines = 0  # key-log lines of those connections
        self._connections: OrderedDict[int, int] = OrderedDict()  # hash -> ktime: _first_read
        self._plausible: Counter[tuple[int, str]] = Counter()  # (slot, protocol) -> events
        self._implausible: Counter[tuple[int, str]] = Counter()
        self._slots_used = 0
        self._groups_used = 0
        self._final: dict[int, dict[str, int]] | None = None  # the counters, once closed
        self._bpf = compile_scoped("tls.c", scope_netns, abi.tls_defines())
        group_slots = self._bpf["group_slots"]
        for index in range(abi.LIBRARY_GROUPS * abi.CANDIDATES):
            group_slots[ctypes.c_int(index)] = ctypes.c_int(abi.ABSENT)
        self._reader = ringbuf.open_reader(self._bpf, "secrets", abi.SECRETS_EVENT)
        # Verified now rather than at a library's first attach, which a task the launch gate
        # holds would wait for.
        self._programs = {name: uprobes.load(self._bpf, name)
                          for name in ("ssl_hs_entry", "ssl_hs_return", "ssl_call")}
        self._links = uprobes.Links()

    @property
    def free_groups(self) -> int:
        return abi.LIBRARY_GROUPS - self._groups_used

    @property
    def free_slots(self) -> int:
        return abi.LAYOUT_SLOTS - self._slots_used

    def attach(self, library: TlsLibrary, group: int | None = None) -> int:
        """Attach a program group's uprobes to `library`: a new group, which reads nothing
        until `add_layout` gives it a slot, or `group` (another copy of the same build).
        Raises KeytapError when no group is free."""
        if group is None:
            if not self.free_groups:
                raise KeytapError(
                    f"more than {abi.LIBRARY_GROUPS} different OpenSSL builds at once")
            group = self._groups_used
            self._groups_used += 1
        programs, offsets = self._programs, library.symbols
        # The programs read the SSL * (rdi); a return probe also needs the return address.
        handshake = cheap_site(library.path, offsets["SSL_do_handshake"], ("rdi", "rsp"))
        probes = [uprobes.Probe(programs["ssl_hs_entry"], handshake),
                  uprobes.Probe(programs["ssl_hs_return"], handshake, retprobe=True),
                  *(uprobes.Probe(programs["ssl_call"],
                                  cheap_site(library.path, offsets[symbol], ("rdi",)))
                    for symbol in library.call_symbols)]
        try:
            self._links.attach(library.path, group, probes)
        except OSError as error:  # the fd limit, a vanished file
            raise KeytapError(f"its uprobes could not all be attached ({error.strerror})"
                              ) from None
        return group

    def add_layout(self, group: int, position: int, layout: Layout) -> int:
        """Write `layout` into a fresh slot and let `group` read with it at `position`
        (0..CANDIDATES-1, replacing whatever slot was there). Returns the slot."""
        if not self.free_slots:
            raise KeytapError(f"more than {abi.LAYOUT_SLOTS} OpenSSL layouts tried at once")
        slot = self._slots_used
        self._slots_used += 1
        table = self._bpf["layouts"]
        leaf = table.Leaf()
        for name in abi.LAYOUT_FIELDS:
            value = getattr(layout, name)
            setattr(leaf, name, abi.ABSENT if value is None else int(value))
        table[ctypes.c_int(slot)] = leaf
        self._bpf["group_slots"][ctypes.c_int(group * abi.CANDIDATES + position)] = \
            ctypes.c_int(slot)
        return slot

    def remove_position(self, group: int, position: int) -> None:
        """`group` stops reading at `position` (its slot's earlier events stay valid)."""
        self._bpf["group_slots"][ctypes.c_int(group * abi.CANDIDATES + position)] = \
            ctypes.c_int(abi.ABSENT)

    def disable(self, slot: int) -> None:
        """The kernel stops reading with `slot`, whichever group lists it."""
        table = self._bpf["layouts"]
        leaf = table[ctypes.c_int(slot)]
        leaf.ssl_version = abi.ABSENT
        table[ctypes.c_int(slot)] = leaf

    def counts(self, slot: int) -> KernelKeyCounts:
        kernel = (self._final[slot] if self._final is not None
                  else self._kernel_counters(slot))
        by_protocol = {p: (self._plausible[slot, p], self._implausible[slot, p])
                       for p in ("1.2", "1.3")}
        return KernelKeyCounts(
            plausible=sum(good for good, _ in by_protocol.values()),
            implausible=kernel["implausible_version"] + sum(
                bad for _, bad in by_protocol.values()),
            ring_full=kernel["ring_full"], not_tls=kernel["not_tls"], by_protocol=by_protocol)

    def total_counts(self) -> KernelKeyCounts:
        total = KernelKeyCounts()
        for slot in range(self._slots_used):
            each = self.counts(slot)
            total.plausible += each.plausible
            total.implausible += each.implausible
            total.ring_full += each.ring_full
            total.not_tls += each.not_tls
        return total

    def _kernel_counters(self, slot: int) -> dict[str, int]:
        counters = self._bpf["counters"]
        width = len(abi.KEY_COUNTERS)
        return {name: sum(counters[ctypes.c_int(slot * width + i)])
                for i, name in enumerate(abi.KEY_COUNTERS)}

    def _deliver(self, record: tuple) -> None:
        event = abi.SecretsEvent._make(record[:-1])  # after the struct: nothing
        first = self._first_read(event)
        secrets = _secrets_of(event)
        protocol = "1.3" if event.version == TLS1_3_VERSION else "1.2"
        try:
            lines = keylog_lines(secrets) if secrets is not None else None
        except ValueError:  # a cipher id no TLS 1.3 suite has: the layout does not fit
            lines = None
        if secrets is None or not lines:
            self._implausible[event.slot, protocol] += 1
            return
        self._plausible[event.slot, protocol] += 1
        if first:
            self.key_lines += len(lines)
        self._on_keys(KeyEvent(event.ktime_ns, secrets.client_random, lines, event.slot,
                               server=bool(event.server), pid=event.tgid,
                               command=task_command(event.comm)))

    def _first_read(self, event: abi.SecretsEvent) -> bool:
        """Whether this is the first read of a connection (candidate slots read it again,
        within milliseconds). Only a hash of the connection is kept, for CONNECTION_MEMORY_NS
        and of at most CONNECTIONS_REMEMBERED: a counter must not grow keytap's memory."""
        key = hash((event.ssl, event.tgid, event.client_random))
        if key in self._connections:
            return False
        connections = self._connections
        connections[key] = event.ktime_ns
        horizon = event.ktime_ns - CONNECTION_MEMORY_NS
        while (len(connections) > CONNECTIONS_REMEMBERED
               or next(iter(connections.values())) < horizon):
            connections.popitem(last=False)
        self.handshakes += 1
        return True

    def poll(self) -> None:
        """Deliver what came. The kernel never wakes keytap for secrets (a wakeup is an IPI,
        ~20 us inside a VM, on the handshake's own path): the capture loop calls this every
        turn instead."""
        for record in self._reader.read(None):
            self._deliver(record)

    def drain(self) -> None:
        self.poll()

    def close(self) -> None:
        """Detach everything; the counters stay readable for the summary."""
        self._final = {slot: self._kernel_counters(slot) for slot in range(self._slots_used)}
        self._links.close()
        self._reader.close()
        self._bpf.cleanup()

    def widen_scope(self, netns: Iterable[int]) -> None:
        """Take keys from these network namespaces too (a pod that started later)."""
        widen_scope(self._bpf, netns)


def compile_scoped(source: str, scope_netns: set[int] | None, defines: dict[str, int]) -> object:
    """Compile a uprobe program that includes bpf/scope.h, its scope filled in."""
    ensure_tracefs()
    allow_many_probes()
    bpf = compile_program(source, _scope_defines(scope_netns) | defines)
    widen_scope(bpf, scope_netns or ())
    return bpf


def widen_scope(bpf: Any, netns: Iterable[int]) -> None:
    """Add namespaces to a scoped program's `scope_netns` map (bpf/scope.h)."""
    for inode in netns:
        bpf["scope_netns"][ctypes.c_uint32(inode)] = ctypes.c_uint8(1)


def _scope_defines(scope_netns: set[int] | None) -> dict[str, int]:
    if scope_netns is None:
        return {"SCOPE_ALL_PROCESSES": 1}
    facts = kernel_facts()
    if facts.namespace_offsets is None:
        raise KeytapError(f"cannot scope keys to the pod's namespace ({facts.namespace_error}): "
                          "use --all-processes")
    return facts.namespace_offsets


def task_command(comm: bytes) -> str:
    """A task's comm as the kernel hands it over (NUL-padded bytes)."""
    return comm.split(b"\0", 1)[0].decode("utf-8", "replace")


def _secrets_of(event: abi.SecretsEvent) -> Tls12Secrets | Tls13Secrets | None:
    """The secrets in a kernel event, or None when they fail the sanity checks."""
    client_random = event.client_random
    if not any(client_random):
        return None
    if event.version == TLS1_3_VERSION:
        return Tls13Secrets(
            client_random=client_random, cipher_id=event.cipher_id,
            handshake_secret=event.handshake_secret,
            handshake_traffic_hash=event.handshake_traffic_hash,
            client_app_traffic_secret=event.client_app_traffic_secret,
            server_app_traffic_secret=event.server_app_traffic_secret,
            exporter_master_secret=event.exporter_master_secret)
    if not 0 < event.master_key_length <= abi.MASTER_KEY_SIZE:
        return None
    return Tls12Secrets(client_random, event.master_key[:event.master_key_length])
