"""The key source: bpf/tls.c's uprobes on the OpenSSL copies that in-scope processes use.

It finds TLS libraries (tls.discovery), picks each one's struct layout (tls.offsets), writes
the layout into one of the program's slots, attaches that slot's probes, and turns the events
into NSS key-log lines (keylog), tagged with their slot: the reorder buffer confirms a slot's
client randoms against the wire, and `check_tables` switches off a slot that fails either half
of the self-check. Uprobes belong to a file, not a process: once a library file
is probed every process mapping it is covered, so refresh() only has to look for new files.
`EVP_PKEY_derive` is not probed: on 3.x it sees only the (EC)DHE shared secret (the key
schedule runs through EVP_KDF_derive), and on 1.1.1 everything it would give is read from the
structs at handshake end anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from keytap.errors import KeytapError
from keytap.events import KeyEvent
from keytap.kernel.btf import Btf, BtfError
from keytap.kernel.loader import compile_program, ensure_tracefs
from keytap.merge.reorder import OriginCheck
from keytap.tls.discovery import LibraryCache, process_libraries
from keytap.tls.keylog import Tls12Secrets, Tls13Secrets, keylog_lines
from keytap.tls.libraries import Flavor, TlsLibrary, inspect_library, process_root
from keytap.tls.offsets import Layout, OffsetTable

SYSTEM_LIBSSL = ("/usr/lib/*/libssl.so.*", "/usr/lib/libssl.so.*", "/usr/lib64/libssl.so.*",
                 "/lib/*/libssl.so.*", "/lib64/libssl.so.*")
LAYOUT_SLOTS = 16  # bpf/tls.c instantiates SLOT_PROGRAMS(0..15): one per OpenSSL build
SELF_CHECK_FAILURES = 3  # implausible reads or contradicted randoms before a table is rejected
TLS1_3_VERSION = 0x0304
MAX_MASTER_KEY = 48
KERNEL_COUNTERS = ("implausible_version", "ring_full", "not_tls")
LAYOUT_FIELDS = (
    "ssl_version", "ssl_type", "server", "s3", "s3_is_pointer", "s3_client_random", "session",
    "session_master_key", "session_master_key_length", "session_cipher", "cipher_id",
    "handshake_secret", "handshake_traffic_hash", "client_app_traffic_secret",
    "server_app_traffic_secret", "exporter_master_secret",
)


@dataclass
class KeyStats:
    """What the key source did; printed in the summary."""

    handshakes: int = 0  # secrets events from the kernel (one per connection, or per change)
    keys_emitted: int = 0  # key-log lines
    implausible: int = 0  # events dropped by a sanity check, in kernel or here
    quic_skipped: int = 0  # reads of QUIC objects (and their inner TLS layer), never secrets
    ring_full: int = 0  # secrets the kernel could not hand over (ring buffer full)
    tables_rejected: int = 0  # libraries whose offsets failed the run-time self-check
    libraries: dict[str, str] = field(default_factory=dict)  # display path -> status

    def summary_lines(self) -> list[str]:
        lines = [f"TLS: {self.handshakes} handshakes seen, {self.keys_emitted} key-log lines read, "
                 f"{self.implausible} events dropped as implausible, {self.ring_full} lost "
                 f"(ring full), {self.quic_skipped} reads of QUIC objects skipped, "
                 f"{self.tables_rejected} libraries switched off by the self-check"]
        lines += [f"  {path}: {status}" for path, status in sorted(self.libraries.items())]
        return lines


def load_offsets(path: Path | None) -> OffsetTable:
    """The committed table, or the user's --offsets FILE, with a one-line error if unusable."""
    try:
        return OffsetTable.load(path)
    except (OSError, ValueError) as error:
        raise KeytapError(f"cannot use offsets table {path or 'offsets/openssl.json'}: {error}"
                          ) from None


def _scope_defines(scope_netns: set[int] | None) -> dict[str, int]:
    if scope_netns is None:
        return {"SCOPE_ALL_PROCESSES": 1}
    try:
        btf = Btf.vmlinux()
        return {"TASK_NSPROXY": btf.offset("task_struct.nsproxy"),
                "NSPROXY_NET_NS": btf.offset("nsproxy.net_ns"),
                "NET_NS_INUM": btf.offset("net.ns.inum")}
    except BtfError as error:
        raise KeytapError(f"cannot scope keys to the pod's namespace ({error}): "
                          "use --all-processes") from None


class KeySource:
    """Owns bpf/tls.c; delivers KeyEvents to `on_keys` while polled."""

    def __init__(self, scope_netns: set[int] | None, offsets: OffsetTable,
                 on_keys: Callable[[KeyEvent], None], extra_libraries: tuple[Path, ...] = (),
                 log: TextIO = sys.stderr) -> None:
        self._scope = scope_netns
        self._offsets = offsets
        self._on_keys = on_keys
        self._log = log
        self.stats = KeyStats()
        self._cache = LibraryCache()
        self._probed: set[tuple[int, int]] = set()  # (st_dev, st_ino) of probed files
        self._slots: dict[tuple[Layout, str], int] = {}  # (layout, build) -> slot
        self._slot_users: dict[int, list[TlsLibrary]] = {}
        self._plausible: Counter[int] = Counter()  # per slot: events that passed every check
        self._implausible: Counter[int] = Counter()  # per slot: events dropped here
        self._rejected: set[int] = set()
        self._scanned_roots: set[Path] = set()
        ensure_tracefs()
        self._bpf = compile_program("tls.c", _scope_defines(scope_netns)
                                    | {"LAYOUT_SLOTS": LAYOUT_SLOTS})
        if scope_netns is not None:
            for inode in scope_netns:
                self._bpf["scope_netns"][ctypes.c_uint32(inode)] = ctypes.c_uint8(1)
        self._bpf["secrets"].open_ring_buffer(self._deliver)
        for path in extra_libraries:
            library = inspect_library(path)
            if library is None:
                raise KeytapError(f"--ssl-lib {path}: no OpenSSL TLS functions in that file")
            self._instrument(library)
        self.refresh()

    def refresh(self) -> None:
        """Instrument TLS libraries of in-scope processes that are not probed yet.

        Besides what running processes have mapped, the system libssl of every file system
        they (and keytap) live in is probed up front: a short-lived client started later (curl
        in a CI job) would finish its handshake before the next rescan. The kernel-side
        namespace check keeps those probes scoped.
        """
        found = process_libraries(self._scope, self._cache)
        roots = {Path("/")} | {process_root(f.library.path) for f in found}
        for library in [f.library for f in found] + self._system_libraries(roots):
            self._instrument(library)

    def check_tables(self, wire: Mapping[int, OriginCheck]) -> None:
        """The run-time self-check of each slot's table, from both of its halves:

        - memory: the values read are implausible (protocol version, cipher, key lengths) and
          never plausible;
        - wire: the client randoms read never matched a ClientHello on the captured
          interfaces, while ClientHellos of the same moments went without keys (`wire`, from
          the reorder buffer, keyed by slot).

        Either means the table does not fit the library (a distro build, a wrong --offsets
        file): the slot's probes stop reading, and keytap says so once per library. Nothing
        unconfirmed was ever written (see reorder), so no garbage reached the file.
        """
        kernel = self._kernel_counts()
        for slot, users in self._slot_users.items():
            if slot in self._rejected:
                continue
            failures = kernel[slot]["implausible_version"] + self._implausible[slot]
            check = wire.get(slot, OriginCheck())
            if not self._plausible[slot] and failures >= SELF_CHECK_FAILURES:
                self._reject(slot, users, f"{failures} implausible reads, e.g. protocol "
                                          "version out of range")
            elif not check.confirmed and check.contradicted >= SELF_CHECK_FAILURES:
                self._reject(slot, users, f"the client randoms of {check.contradicted} "
                                          "handshakes were in no ClientHello on the wire")

    def _reject(self, slot: int, users: list[TlsLibrary], reason: str) -> None:
        self._rejected.add(slot)
        table = self._bpf["layouts"]
        leaf = table[ctypes.c_int(slot)]
        leaf.ssl_version = -1  # bpf/tls.c reads nothing for such a slot
        table[ctypes.c_int(slot)] = leaf
        for library in users:
            status = (f"OpenSSL {library.version}: struct offsets do not fit this build "
                      f"({reason}); its keys are no longer read")
            self.stats.libraries[library.display_path] = status
            self.stats.tables_rejected += 1
            self._log.write(f"keytap: TLS library {library.display_path}: {status}\n")

    def _system_libraries(self, roots: set[Path]) -> list[TlsLibrary]:
        libraries = []
        for root in roots - self._scanned_roots:
            self._scanned_roots.add(root)
            for pattern in SYSTEM_LIBSSL:
                for path in sorted(root.glob(pattern.lstrip("/"))):
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
        status = self._attach(library)
        self.stats.libraries[library.display_path] = status
        self._log.write(f"keytap: TLS library {library.display_path}: {status}\n")

    def _attach(self, library: TlsLibrary) -> str:
        name = f"OpenSSL {library.version}" if library.version else "OpenSSL (version unknown)"
        if library.flavor is not Flavor.OPENSSL:
            return f"{library.flavor.name.title()} {library.version or ''} is not supported yet"
        layout = self._offsets.lookup(library.version or "", library.build_id)
        if layout is None:
            return (f"{name}: no struct offsets for this version, its keys are not captured "
                    f"(give a table with --offsets FILE)")
        if library.missing_symbols:
            return f"{name}: missing symbols {', '.join(library.missing_symbols)}"
        slot = self._slot_for(layout, library.build_id or str(library.path))
        if slot is None:
            return f"{name}: more than {LAYOUT_SLOTS} different OpenSSL builds at once, skipped"
        self._slot_users.setdefault(slot, []).append(library)
        path = str(library.path).encode()
        self._bpf.attach_uprobe(name=path, sym=b"SSL_do_handshake", fn_name=b"ssl_hs_entry")
        self._bpf.attach_uretprobe(name=path, sym=b"SSL_do_handshake",
                                   fn_name=f"ssl_hs_return_{slot}".encode())
        self._bpf.attach_uprobe(name=path, sym=library.in_init_symbol.encode(),
                                fn_name=f"ssl_in_init_{slot}".encode())
        return f"{name} ({library.linkage.value}), probed"

    def _slot_for(self, layout: Layout, build: str) -> int | None:
        """A slot per build, not per layout: the self-check judges a slot, and a build that
        does not fit must not ride on the confirmation of another build of the same version.
        Copies of one build (the same file in several containers) share their slot."""
        if (layout, build) not in self._slots:
            if len(self._slots) == LAYOUT_SLOTS:
                return None
            slot = len(self._slots)
            table = self._bpf["layouts"]
            leaf = table.Leaf()
            for name in LAYOUT_FIELDS:
                value = getattr(layout, name)
                setattr(leaf, name, -1 if value is None else int(value))
            table[ctypes.c_int(slot)] = leaf
            self._slots[layout, build] = slot
        return self._slots[layout, build]

    def _deliver(self, _ctx: object, data: int, _size: int) -> None:
        event = self._bpf["secrets"].event(data)
        self.stats.handshakes += 1
        secrets = _secrets_of(event)
        try:
            lines = keylog_lines(secrets) if secrets is not None else None
        except ValueError:  # a cipher id no TLS 1.3 suite has: the table does not fit
            lines = None
        if secrets is None or lines is None or event.slot in self._rejected:
            self.stats.implausible += 1
            self._implausible[event.slot] += 1
            return
        self._plausible[event.slot] += 1
        self.stats.keys_emitted += len(lines)
        self._on_keys(KeyEvent(event.ktime_ns, secrets.client_random, lines, event.slot))

    def poll(self, timeout_ms: int) -> None:
        self._bpf.ring_buffer_poll(timeout_ms)

    def drain(self) -> None:
        self._bpf.ring_buffer_consume()

    def _kernel_counts(self) -> dict[int, dict[str, int]]:
        """The kernel's per-slot counters, summed over CPUs."""
        counters = self._bpf["counters"]
        return {slot: {name: sum(counters[ctypes.c_int(slot * len(KERNEL_COUNTERS) + i)])
                       for i, name in enumerate(KERNEL_COUNTERS)}
                for slot in range(LAYOUT_SLOTS)}

    def close(self) -> None:
        kernel = self._kernel_counts().values()
        self.stats.implausible += sum(c["implausible_version"] for c in kernel)
        self.stats.ring_full = sum(c["ring_full"] for c in kernel)
        self.stats.quic_skipped = sum(c["not_tls"] for c in kernel)
        self._bpf.cleanup()


def _secrets_of(event) -> Tls12Secrets | Tls13Secrets | None:
    """The secrets in a kernel event, or None when they fail the sanity checks."""
    client_random = bytes(event.client_random)
    if not any(client_random):
        return None
    if event.version == TLS1_3_VERSION:
        return Tls13Secrets(
            client_random=client_random, cipher_id=event.cipher_id,
            handshake_secret=bytes(event.handshake_secret),
            handshake_traffic_hash=bytes(event.handshake_traffic_hash),
            client_app_traffic_secret=bytes(event.client_app_traffic_secret),
            server_app_traffic_secret=bytes(event.server_app_traffic_secret),
            exporter_master_secret=bytes(event.exporter_master_secret))
    if not 0 < event.master_key_length <= MAX_MASTER_KEY:
        return None
    return Tls12Secrets(client_random, bytes(event.master_key[:event.master_key_length]))
