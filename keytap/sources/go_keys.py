"""The Go key source: bpf/go_tls.c compiled, one build per Go binary, its lines gathered.

Go hands over one secret per writeKeyLog call, while the reorder buffer judges a session's
keys together (a TLS 1.3 proof needs both handshake secrets and both traffic secrets). So the
lines are gathered per (process, client random) and leave as one KeyEvent when complete: the
CLIENT_RANDOM line of TLS 1.2, or the four TLS 1.3 traffic secrets. A session that never
completes (a handshake cut short) leaves with what it has after GATHER_NS, or when the capture
ends, and is counted: nothing is dropped here. Each build has its own self-check slot,
numbered from abi.GO_FIRST_SLOT, so OpenSSL's layout slots and Go's never meet.
"""

from __future__ import annotations

import ctypes
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from keytap.errors import KeytapError
from keytap.events import KeyEvent
from keytap.kernel import abi, ringbuf, uprobes
from keytap.kernel.probe_site import cheap_site
from keytap.sources.keys import compile_scoped, task_command, widen_scope
from keytap.tls.golang import GoBuild
from keytap.tls.libraries import TlsLibrary

GATHER_NS = 1_000_000_000  # one handshake's lines come within this of its first
TLS12_LABEL = "CLIENT_RANDOM"
TLS13_LABELS = ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0")
PAGE = 4096
# What go_key_log_registers reads: writeKeyLog's label, client random and secret (ABIInternal:
# RBX, RCX, RDI, RSI, R9, R10), and the return address on the stack.
GO_REGISTER_ARGUMENTS = ("rbx", "rcx", "rdi", "rsi", "r9", "r10", "rsp")


@dataclass
class _Session:
    """The lines of one handshake seen so far."""

    first_ns: int
    slot: int
    server: bool
    command: str  # the process's comm at its first line
    lines: dict[str, str] = field(default_factory=dict)  # label -> line
    last_ns: int = 0

    @property
    def complete(self) -> bool:
        return TLS12_LABEL in self.lines or all(label in self.lines for label in TLS13_LABELS)


class GoKeySource:
    """Owns bpf/go_tls.c; delivers KeyEvents to `on_keys` while polled."""

    def __init__(self, scope_netns: set[int] | None,
                 on_keys: Callable[[KeyEvent], None]) -> None:
        self._on_keys = on_keys
        self.handshakes = 0  # sessions delivered
        self.key_lines = 0
        self.incomplete = 0  # sessions delivered without all their lines
        self.role_unknown = 0  # lines whose caller was no handshake function (taken as client)
        self._builds: list[GoBuild] = []
        self._sessions: OrderedDict[tuple[int, bytes], _Session] = OrderedDict()
        self._final: list[dict[str, int]] | None = None
        self._bpf = compile_scoped("go_tls.c", scope_netns, abi.go_tls_defines())
        self._reader = ringbuf.open_reader(self._bpf, "go_secrets", abi.GO_SECRET_EVENT)
        # Verified now, not at a binary's first attach, which a task held by the launch gate
        # would wait for.
        self._programs = {kind: uprobes.load(self._bpf, f"go_key_log_{kind}")
                          for kind in ("registers", "stack")}
        self._links = uprobes.Links()

    def attach(self, library: TlsLibrary) -> int:
        """Probe writeKeyLog in `library` (a Go binary); returns its self-check slot."""
        go = library.go
        assert go is not None and go.keylog_offset is not None and go.register_abi is not None
        if len(self._builds) >= abi.GO_BUILDS:
            raise KeytapError(f"more than {abi.GO_BUILDS} Go binaries at once")
        build = len(self._builds)
        program = self._programs["registers" if go.register_abi else "stack"]
        site = cheap_site(library.path, go.keylog_offset,
                          GO_REGISTER_ARGUMENTS if go.register_abi else ("rsp",))
        try:
            self._links.attach(library.path, build, [uprobes.Probe(program, site)])
        except OSError as error:  # the fd limit, a vanished file
            raise KeytapError(f"its uprobe could not be attached ({error.strerror})") from None
        self._builds.append(go)
        self._bpf["build_enabled"][ctypes.c_int(build)] = ctypes.c_uint8(1)
        return abi.GO_FIRST_SLOT + build

    def disable(self, slot: int) -> None:
        """The kernel stops reading for `slot`'s build."""
        self._bpf["build_enabled"][ctypes.c_int(slot - abi.GO_FIRST_SLOT)] = ctypes.c_uint8(0)

    def counts(self) -> dict[str, int]:
        """Kernel counters summed over every build (abi.GO_COUNTERS)."""
        per_build = self._final if self._final is not None else self._kernel_counters()
        return {name: sum(each[name] for each in per_build) for name in abi.GO_COUNTERS}

    def _kernel_counters(self) -> list[dict[str, int]]:
        counters = self._bpf["go_counters"]
        width = len(abi.GO_COUNTERS)
        return [{name: sum(counters[ctypes.c_int(build * width + i)])
                 for i, name in enumerate(abi.GO_COUNTERS)} for build in range(len(self._builds))]

    def _deliver(self, record: tuple) -> None:
        event = abi.GoSecretEvent._make(record[:-1])  # after the struct: nothing
        build = self._builds[event.build]
        label = event.label[:event.label_len].decode("ascii", "replace")
        random = event.client_random
        line = f"{label} {random.hex()} {event.secret[:event.secret_len].hex()}"
        key = (event.tgid, random)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session(
                event.ktime_ns, abi.GO_FIRST_SLOT + event.build, self._is_server(build, event),
                task_command(event.comm))
        session.lines[label] = line
        session.last_ns = event.ktime_ns
        if session.complete:
            self._send(key)

    def _is_server(self, build: GoBuild, event: abi.GoSecretEvent) -> bool:
        """Whether the caller is crypto/tls's server handshake: found by the return address,
        less the load address (the probed address minus the function's link-time one, whole
        pages: the probe sits within a few bytes of the entry, keytap.kernel.probe_site)."""
        bias = (event.function_address - build.keylog_address) & ~(PAGE - 1)
        role = build.role_of(event.return_address - bias - 1)  # -1: inside the CALL
        if role is None:
            self.role_unknown += 1
        return bool(role)

    def _send(self, key: tuple[int, bytes]) -> None:
        session = self._sessions.pop(key)
        if not session.complete:
            self.incomplete += 1
        order = (TLS12_LABEL, *TLS13_LABELS)
        labels = sorted(session.lines, key=lambda label: (
            order.index(label) if label in order else len(order), label))
        lines = tuple(session.lines[label] for label in labels)
        self.handshakes += 1
        self.key_lines += len(lines)
        self._on_keys(KeyEvent(session.last_ns, key[1], lines, session.slot,
                               server=session.server, pid=key[0], command=session.command))

    def _expire(self, now_ns: int | None) -> None:
        """Send sessions older than GATHER_NS (all of them when `now_ns` is None)."""
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if now_ns is not None and now_ns - session.first_ns < GATHER_NS:
                break
            self._send(key)

    def poll(self) -> None:
        """Deliver what came (never woken by the kernel: see KeySource.poll)."""
        self._take()
        self._expire(time.monotonic_ns())  # the kernel's ktime is CLOCK_MONOTONIC too

    def drain(self) -> None:
        """Everything the kernel handed over, incomplete sessions included (the end)."""
        self._take()
        self._expire(None)

    def _take(self) -> None:
        for record in self._reader.read(None):
            self._deliver(record)

    def close(self) -> None:
        """Detach everything; the counters stay readable for the summary."""
        self._final = self._kernel_counters()
        self._links.close()
        self._reader.close()
        self._bpf.cleanup()

    def widen_scope(self, netns: Iterable[int]) -> None:
        """Take keys from these network namespaces too (a pod that started later)."""
        widen_scope(self._bpf, netns)
