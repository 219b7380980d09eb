"""Which TLS libraries to probe, with which layouts, and what to say about them.

Policy over the key source's mechanism (sources.keys). For each OpenSSL build found (discovery)
the layout comes from, in this order: the table's exact entry (build id, then version), a
layout this build proved in an earlier capture (tls.remembered), or candidates: the layouts of
the nearest releases (OffsetTable.candidates), read CANDIDATES at a time. The self-check
decides which fit; a rejected candidate makes room for the next one, within the same capture.
Uprobes belong to a file, not a process: once a library file is probed every process mapping
it is covered, so refresh() only has to look for new files.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from keytap.errors import KeytapError
from keytap.kernel import abi
from keytap.kernel.peers import netns_id
from keytap.tls.accessors import mismatches
from keytap.tls.candidates import candidate_layouts, machine_code_offsets
from keytap.tls.discovery import LibraryCache, process_libraries
from keytap.tls.golang import KEYLOG_FUNCTION
from keytap.tls.libraries import Flavor, TlsLibrary, inspect_library, process_root
from keytap.tls.offsets import Layout, OffsetTable
from keytap.tls.remembered import RememberedLayouts
from keytap.tls.selfcheck import PROTOCOLS, SelfCheck, SlotCheck, SlotState

SYSTEM_LIBSSL = ("/usr/lib/*/libssl.so.*", "/usr/lib/libssl.so.*", "/usr/lib64/libssl.so.*",
                 "/lib/*/libssl.so.*", "/lib64/libssl.so.*")
REMEMBERED = "the layout proven in an earlier capture"  # (tls.remembered)


class KeyReader(Protocol):
    """What the probes need of the key source (sources.keys.KeySource)."""

    handshakes: int
    key_lines: int

    @property
    def free_slots(self) -> int: ...
    def attach(self, library: TlsLibrary, group: int | None = None) -> int: ...
    def add_layout(self, group: int, position: int, layout: Layout) -> int: ...
    def remove_position(self, group: int, position: int) -> None: ...
    def disable(self, slot: int) -> None: ...
    def counts(self, slot: int) -> SlotCounts: ...
    def total_counts(self) -> SlotCounts: ...


class GoKeyReader(Protocol):
    """What the probes need of the Go key source (sources.go_keys.GoKeySource)."""

    handshakes: int
    key_lines: int
    incomplete: int

    def attach(self, library: TlsLibrary) -> int: ...
    def disable(self, slot: int) -> None: ...
    def counts(self) -> dict[str, int]: ...


class SlotCounts(Protocol):
    plausible: int
    implausible: int
    ring_full: int
    not_tls: int
    by_protocol: dict[str, tuple[int, int]]


@dataclass
class _Build:
    """One OpenSSL build being probed (copies of one file in several containers share it)."""

    name: str  # "OpenSSL 3.0.22"
    build_id: str | None
    version: str | None
    linkage: str
    group: int
    libraries: list[TlsLibrary] = field(default_factory=list)
    queue: list[tuple[str, Layout]] | None = None  # candidates not yet loaded (None: not
    # formed yet; an exact or remembered layout is tried alone first)
    positions: dict[int, int] = field(default_factory=dict)  # slot -> position in the group
    labels: dict[int, str] = field(default_factory=dict)  # slot -> where its layout came from
    layouts: dict[int, Layout] = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)
    announced: dict[int, list[str]] = field(default_factory=dict)  # slot -> proven protocols
    refuted: set[tuple[int, str]] = field(default_factory=set)  # (slot, protocol) said
    exact: bool = False
    derived: dict[str, int | bool] | None = None  # what its machine code shows, once asked
    contradicted: list[str] = field(default_factory=list)  # its version entry's wrong fields


class TlsProbes:
    """Finds the TLS libraries of in-scope processes and keeps the key source reading them."""

    def __init__(self, scope_netns: set[int] | None, table: OffsetTable, source: KeyReader,
                 selfcheck: SelfCheck, log: TextIO,
                 remembered: RememberedLayouts | None = None,
                 go_source: GoKeyReader | None = None,
                 own_pids: frozenset[int] = frozenset()) -> None:
        self._scope = scope_netns
        self._own = own_pids  # keytap's processes: they hold cryptography's OpenSSL, never TLS
        self._table = table
        self._source = source
        self._selfcheck = selfcheck
        self._log = log
        self._remembered = remembered
        self._go = go_source
        self._go_slots: dict[int, tuple[str, TlsLibrary]] = {}  # slot -> (name, binary)
        self._go_said: dict[int, tuple[str, ...]] = {}  # slot -> protocols said proven
        self._cache = LibraryCache()
        self._probed: set[tuple[int, int]] = set()  # (st_dev, st_ino) of probed files
        self._builds: dict[str, _Build] = {}
        self._slot_build: dict[int, _Build] = {}
        self._scanned_roots: set[Path] = set()
        self.libraries: dict[str, str] = {}  # display path -> status, for the summary
        self.tables_rejected = 0  # builds for which no layout fits
        # The launch gate's thread instruments files too (inspect_opened): one at a time, and
        # a verdict may come while refresh() or check() holds the lock (same thread).
        self._lock = threading.RLock()
        selfcheck.listeners.append(self._locked_verdict)

    def add_libraries(self, paths: tuple[Path, ...]) -> None:
        """--ssl-lib: these files too, whoever maps them."""
        for path in paths:
            library = inspect_library(path)
            if library is None:
                raise KeytapError(f"--ssl-lib {path}: no OpenSSL TLS functions in that file")
            self._instrument(library)

    @property
    def roots(self) -> set[Path]:
        """The file systems' roots of the processes seen so far (keytap's own included)."""
        return set(self._scanned_roots)

    def widen_scope(self, netns: set[int]) -> None:
        """Processes in these network namespaces are in scope from now on (a new pod's)."""
        if self._scope is not None:
            with self._lock:
                self._scope = self._scope | netns

    def library_of(self, slot: int) -> str:
        """The TLS library and version that `slot` reads, as a packet comment names it."""
        with self._lock:
            if slot in self._go_slots:
                name, library = self._go_slots[slot]
                return f"{name} ({library.display_path})"
            build = self._slot_build.get(slot)
            if build is None:
                return "a library keytap did not probe"
            return f"{build.name} ({build.libraries[0].display_path})"

    def in_scope(self, pid: int) -> bool:
        """Whether keys are taken from `pid` (the launch gate holds only such tasks)."""
        if pid in self._own:
            return False
        if self._scope is None:
            return True
        try:
            return netns_id(pid) in self._scope
        except OSError:
            return False

    def inspect_opened(self, fd: int, name: str) -> None:
        """A file an in-scope task is opening (it waits meanwhile): probe it if it is a TLS
        library. `fd` is open on it; `name` is its path as the kernel names it, used when it
        is that same file here (its libcrypto is then found beside it), else the fd's path."""
        path = Path(f"/proc/self/fd/{fd}")
        with contextlib.suppress(OSError):
            here = Path(name)
            if os.path.samestat(here.stat(), os.fstat(fd)):
                path = here
        with self._lock, contextlib.suppress(OSError):
            library = self._cache.inspect(path, name)
            if library is not None:
                self._instrument(library)

    def refresh(self) -> None:
        """Instrument TLS libraries of in-scope processes that are not probed yet.

        Besides what running processes have mapped, the system libssl of every file system
        they (and keytap) live in is probed up front: a short-lived client started later (curl
        in a CI job) would finish its handshake before the next rescan. The kernel-side
        namespace check keeps those probes scoped.
        """
        found = [entry for entry in process_libraries(self._scope, self._cache)
                 if entry.pid not in self._own]
        roots = {Path("/")} | {process_root(f.library.path) for f in found}
        with self._lock:
            for library in [f.library for f in found] + self._system_libraries(roots):
                self._instrument(library)

    def check(self) -> None:
        """Hand the key source's per-slot counts to the self-check."""
        with self._lock:
            self._check_counts()

    def _check_counts(self) -> None:
        for slot in list(self._slot_build):
            counts = self._source.counts(slot)
            self._selfcheck.implausible(slot, None, counts.implausible, counts.plausible)
            for protocol, (good, bad) in counts.by_protocol.items():
                self._selfcheck.implausible(slot, protocol, bad, good)

    def summary(self) -> dict[str, object]:
        """The key side's part of the summary."""
        totals = self._source.total_counts()
        go = self._go.counts() if self._go is not None else {"implausible": 0, "ring_full": 0}
        go_sources = [self._go] if self._go is not None else []
        return {"handshakes": sum(s.handshakes for s in [self._source, *go_sources]),
                "key_lines": sum(s.key_lines for s in [self._source, *go_sources]),
                "implausible_events": totals.implausible + go["implausible"],
                "secrets_lost_ring_full": totals.ring_full + go["ring_full"],
                "go_sessions_incomplete": sum(s.incomplete for s in go_sources),
                "quic_reads_skipped": totals.not_tls, "tables_rejected": self.tables_rejected,
                "libraries": dict(self.libraries)}

    def _system_libraries(self, roots: set[Path]) -> list[TlsLibrary]:
        libraries = []
        for root in roots - self._scanned_roots:
            self._scanned_roots.add(root)
            for pattern in SYSTEM_LIBSSL:
                for path in _glob(root, pattern.lstrip("/")):
                    with contextlib.suppress(OSError):
                        library = self._cache.inspect(path, "/" + str(path.relative_to(root)))
                        if library is not None:
                            libraries.append(library)
        return libraries

    def _instrument(self, library: TlsLibrary) -> None:
        try:
            stat = library.path.stat()
        except OSError:
            return  # the process is gone
        identity = (stat.st_dev, stat.st_ino)
        if identity in self._probed:
            return
        self._probed.add(identity)
        self._say(library, self._attach(library))

    def _attach(self, library: TlsLibrary) -> str:
        if library.flavor is Flavor.GO:
            return self._attach_go(library)
        name = f"OpenSSL {library.version}" if library.version else "OpenSSL (version unknown)"
        if library.flavor is not Flavor.OPENSSL:
            return f"{library.flavor.name.title()} {library.version or ''} is not supported yet"
        if library.missing_symbols:
            return f"{name}: missing symbols {', '.join(library.missing_symbols)}"
        key = library.build_id or str(library.path)
        build = self._builds.get(key)
        if build is not None:  # another copy of a build already probed: same layouts
            try:
                self._source.attach(library, build.group)
            except KeytapError as error:  # what did attach reads, proven like the rest
                return f"{name}: {error}; some of its handshakes may go without keys"
            build.libraries.append(library)
            return self._status(build)
        try:
            build = self._new_build(name, library, key)
        except KeytapError as error:
            return f"{name}: {error}, skipped"
        if build is None:
            return (f"{name}: no struct offsets for this version or anything near it, its keys "
                    f"are not captured (give a table with --offsets FILE)")
        return self._status(build)

    def _attach_go(self, library: TlsLibrary) -> str:
        """A Go binary: its own slot, a candidate until a session of it is proven."""
        go = library.go
        assert go is not None
        name = f"Go {go.version.removeprefix('go')}" if go.version else "Go (version unknown)"
        if go.keylog_address is None:
            return f"{name}: {go.reason}; its keys are not captured"
        if go.register_abi is None:
            return (f"{name}: no Go version in its build info, so not how {KEYLOG_FUNCTION} "
                    "takes its arguments; its keys are not captured")
        if self._go is None:
            return f"{name}: no Go key source; its keys are not captured"
        try:
            slot = self._go.attach(library)
        except KeytapError as error:
            return f"{name}: {error}, skipped"
        self._go_slots[slot] = (name, library)
        self._selfcheck.add(slot, f"go {slot}")
        abi_name = "register" if go.register_abi else "stack"
        return f"{name} (static), probed at {KEYLOG_FUNCTION} ({abi_name} ABI)"

    def _on_go_verdict(self, slot: int, check: SlotCheck) -> None:
        name, library = self._go_slots[slot]
        if check.state is SlotState.REJECTED:
            assert self._go is not None
            self._go.disable(slot)
            self._say(library, f"{name}: its keys did not prove themselves ({check.reason}); "
                               "they are no longer read")
            return
        protocols = tuple(self._selfcheck.proven_protocols(slot))
        if protocols and self._go_said.get(slot) != protocols:
            self._go_said[slot] = protocols
            self._say(library, f"{name} (static), probed at {KEYLOG_FUNCTION}; proven on the "
                               f"wire (TLS {' and '.join(protocols)})")

    def _new_build(self, name: str, library: TlsLibrary, key: str) -> _Build | None:
        exact = self._table.lookup_build(library.build_id)
        derived, contradicted = None, []
        if exact is None:
            exact = self._table.lookup_version(library.version or "")
            if exact is not None and self._table.shipped:
                # A vendored or patched copy may carry the version number and other members:
                # its machine code says whether the entry fits.
                derived = machine_code_offsets(library.path)
                contradicted = mismatches(derived, exact)
                if contradicted:
                    exact = None
        remembered = (self._remembered.lookup(library.build_id)
                      if exact is None and self._remembered is not None else None)
        if exact is None and remembered is None and not self._table.candidates(
                library.version or ""):
            return None
        build = _Build(name, library.build_id, library.version, library.linkage.value,
                       group=self._source.attach(library), libraries=[library],
                       derived=derived, contradicted=contradicted)
        self._builds[key] = build
        if exact is not None:
            build.exact = True
            self._load(build, 0, "its exact table entry", exact)
        elif remembered is not None:
            layout, protocols = remembered
            self._load(build, 0, REMEMBERED, layout, proven=protocols)
            build.announced[next(iter(build.positions))] = list(protocols)
        else:
            self._load_candidates(build)
        return build

    def _load(self, build: _Build, position: int, label: str, layout: Layout,
              proven: tuple[str, ...] = ()) -> None:
        slot = self._source.add_layout(build.group, position, layout)
        self._slot_build[slot] = build
        build.positions[slot] = position
        build.labels[slot] = label
        build.layouts[slot] = layout
        build.tried.append(label)
        self._selfcheck.add(slot, str(build.group), proven=proven)

    def _load_candidates(self, build: _Build) -> None:
        if build.queue is None:
            tried = set(build.layouts.values())
            if build.derived is None:
                build.derived = machine_code_offsets(build.libraries[0].path)
            build.queue = [c for c in candidate_layouts(
                self._table, build.version or "", build.derived) if c[1] not in tried]
        used = set(build.positions.values())
        for position in range(abi.CANDIDATES):
            if position in used or not build.queue:
                continue
            if not self._source.free_slots:
                break
            label, layout = build.queue.pop(0)
            self._load(build, position, label, layout)

    def _locked_verdict(self, slot: int, check: SlotCheck) -> None:
        with self._lock:
            self._on_verdict(slot, check)

    def _on_verdict(self, slot: int, check: SlotCheck) -> None:
        if slot in self._go_slots:
            self._on_go_verdict(slot, check)
            return
        build = self._slot_build.get(slot)
        if build is None or slot not in build.positions:
            return
        self._say_rejected_protocols(build, slot, check)
        if check.state is SlotState.CANDIDATE:
            self._load_candidates_for_open_protocols(build)
            return  # decided for one protocol, still open for the other
        if check.state is SlotState.PROVEN:
            protocols = self._selfcheck.proven_protocols(slot)
            if build.announced.get(slot) != protocols:
                build.announced[slot] = protocols
                if self._remembered is not None and build.build_id and not build.exact:
                    self._remembered.remember(build.build_id, build.version,
                                              build.layouts[slot], protocols)
                self._say_all(build, self._status(build, proven=slot))
            self._load_candidates_for_open_protocols(build)
            return
        self._source.disable(slot)
        position = build.positions.pop(slot)
        self._source.remove_position(build.group, position)
        proven = {p for s in build.positions for p in self._selfcheck.proven_protocols(s)}
        if proven == set(PROTOCOLS):
            return  # siblings were proven for both protocols: nothing more to try
        if proven:
            self._load_candidates(build)
            return  # one protocol proven; candidates for the other keep being tried
        was_proven = check.verified > 0
        if not was_proven:
            self._load_candidates(build)
        if build.positions:
            self._say_all(build, f"{build.name}: {build.labels[slot]} does not fit this build "
                                 f"({check.reason}); trying {len(build.positions)} other "
                                 "layout(s)")
            return
        self.tables_rejected += 1
        what = "its layout" if was_proven else f"none of {len(build.tried)} layouts tried"
        self._say_all(build, (
            f"{build.name}: struct offsets do not fit this build ({check.reason}; {what}: "
            f"{', '.join(build.tried[:4])}{', ...' if len(build.tried) > 4 else ''}); its keys "
            f"are no longer read. Add its entry: tools/gen_offsets.py --tarball "
            f"openssl-{build.version or 'VERSION'}.tar.gz (offsets/README.md), or --offsets FILE"))

    def _say_rejected_protocols(self, build: _Build, slot: int, check: SlotCheck) -> None:
        """Once per slot and protocol, when one protocol is refuted and the other is not."""
        if check.state is SlotState.REJECTED:
            return  # said below, for the whole slot
        for protocol, each in check.protocols.items():
            if each.state is SlotState.REJECTED and (slot, protocol) not in build.refuted:
                build.refuted.add((slot, protocol))
                self._say_all(build, f"{build.name}: {build.labels[slot]} does not fit TLS "
                                     f"{protocol} sessions of this build ({check.reason})")

    def _load_candidates_for_open_protocols(self, build: _Build) -> None:
        """More candidates while some protocol has no slot that is proven or still open."""
        for protocol in PROTOCOLS:
            states = {self._selfcheck.state(s, protocol) for s in build.positions}
            if not states & {SlotState.PROVEN, SlotState.CANDIDATE}:
                self._load_candidates(build)
                return

    def _status(self, build: _Build, proven: int | None = None) -> str:
        base = f"{build.name} ({build.linkage}), probed"
        if build.exact and (proven is None or build.labels.get(proven) == build.tried[0]):
            return base
        if proven is not None:
            protocols = " and ".join(self._selfcheck.proven_protocols(proven))
            if build.labels[proven] == REMEMBERED:
                return f"{base}; {REMEMBERED}, and on the wire again (TLS {protocols})"
            return f"{base}; {build.labels[proven]} proven on the wire (TLS {protocols})"
        labels = [build.labels[s] for s in build.positions]
        if labels == [REMEMBERED]:
            return f"{base}; {REMEMBERED}"
        entry = (f"its table entry by version disagrees with its machine code "
                 f"({', '.join(build.contradicted)})" if build.contradicted
                 else "no exact table entry")
        return (f"{base}; {entry}, proving {len(labels)} candidate layouts "
                f"({', '.join(label.removeprefix('the layout of ') for label in labels)})")

    def _say_all(self, build: _Build, status: str) -> None:
        for library in build.libraries:
            self._say(library, status)

    def _say(self, library: TlsLibrary, status: str) -> None:
        if self.libraries.get(library.display_path) == status:
            return  # a copy of a build whose news is for its other copies
        self.libraries[library.display_path] = status
        self._log.write(f"keytap: TLS library {library.display_path}: {status}\n")


def _glob(root: Path, pattern: str) -> list[Path]:
    """What `root.glob` finds, or nothing when the root goes away meanwhile: a /proc/PID/root
    whose process exits mid-walk (pathlib lets that FileNotFoundError out)."""
    try:
        return sorted(root.glob(pattern))
    except OSError:
        return []
