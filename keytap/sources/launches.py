"""Hold a task that opens a TLS library keytap has not inspected yet, until keytap has.

Why: tls.probes finds new libraries by rescanning /proc/PID/maps once a second, and a process
started after keytap that opens a file nobody had mapped before (a static binary with OpenSSL
inside, a wheel's libssl, a container's own libssl) has finished its first handshake by then.
fanotify permission events stop the opener inside open()/execve() until we answer, so the
file's uprobes are attached before its first byte is mapped. We always answer FAN_ALLOW.

Mechanism (measured on 6.18, see tests/lab/test_launch_gate.py):
- FAN_OPEN_PERM alone, marked with FAN_MARK_FILESYSTEM. execve() raises FAN_OPEN_PERM too, and
  marking FAN_OPEN_EXEC_PERM as well only doubles the events of every exec. No permission
  events come for FIFOs, devices or directories.
- Pre-filter through the event's fd (never by path): not ELF, or none of NEEDLES
  (b"SSL_do_handshake\\0", a Go binary's b".go.buildinfo\\0") in any string table, gets
  an inode ignore mark at once, whoever opens it. The mark is FAN_MARK_EVICTABLE (does not
  pin the inode: one mark per file opened on the host) and not SURV_MODIFY: a write clears
  it, so a file created empty and filled later (pip writing a wheel) is classified again at
  its next open. pread, not mmap: a file truncated under an mmap raises SIGBUS. Other ELF
  files go to keytap: out of scope (`in_scope(pid)` false) is allowed unmarked, so a later
  in-scope open is still seen; in scope waits for `inspect`.
- The group lives in a helper process (this file run as a script, stdlib only). An in-process
  thread deadlocks: every open by keytap itself raises an event for that thread, and a thread
  that opens while holding the GIL (dlopen of an extension module during an import,
  ctypes.CDLL) leaves it unable to answer; a stuck listener stalls every open on the host.
  The helper answers keytap's own pid and its own at once, so `inspect` may open by path,
  and it allows a held event after `max_hold` seconds if keytap does not answer (stopped,
  busy, hung). Its end (keytap SIGKILLed: socket EOF, or pidfd) closes the group, and the
  kernel then allows every pending event. An exec by a vfork child of keytap's (CPython's
  subprocess vforks with the GIL held) shares keytap's memory (kcmp KCMP_VM) and is let
  through at once: keytap could not answer before that exec returns.
- Never mark a stacking file system: creating the event fd for an overlayfs file opens its
  backing file, which raises an event inside the listener's own read(), on the lower file
  system that "/" already marks. add_root() marks an overlay's layers instead (the backing
  file's events carry the opener's pid); a second reader thread answers such nested events
  should another stacking file system (FUSE passthrough, fuse-overlayfs) do the same.
- No library: PyPI's pyfanotify (0.3) forwards notification events to a multiprocessing child
  and cannot answer permission events; butter (2021) is unmaintained. Two libc calls via ctypes.

What a held task sees: it sleeps in open()/execve() in state D (wchan fanotify_handle_event).
SIGKILL ends it at once; other signals (SIGINT, SIGTERM, SIGTSTP, SIGSTOP, a shell's Ctrl-C
or Ctrl-Z) and a ptrace stop take effect when the call returns, which does not fail with EINTR;
a tracer can attach meanwhile. Nothing else differs: same result, same exit code.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import json
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

SWITCH_INTERVAL_S = 0.0005
FAN_CLOEXEC = 0x01
FAN_CLASS_CONTENT = 0x04
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
FAN_MARK_ADD = 0x01
FAN_MARK_IGNORED_MASK = 0x20
FAN_MARK_FILESYSTEM = 0x100
FAN_MARK_EVICTABLE = 0x200
FAN_OPEN_PERM = 0x10000
FAN_Q_OVERFLOW = 0x4000
FAN_ALLOW = 0x01
AT_FDCWD = -100
_EVENT = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_RESPONSE = struct.Struct("=iI")  # struct fanotify_response
_METADATA_VERSION = 3

OVERLAYFS_MAGIC = 0x794C7630
# OpenSSL's API names SSL_do_handshake; a Go binary names its build info section (crypto/tls
# or not: that is for TlsProbes.inspect_opened to find out, once per file)
NEEDLES = (b"SSL_do_handshake\x00", b"\x00.go.buildinfo\x00")
NOT_ELF, NO_TLS, TLS = "not_elf", "no_tls", "tls"
_SHT_STRTAB = 3
_CHUNK = 1 << 20

# Messages on the SOCK_SEQPACKET pair: one letter, then a struct.
_READY = b"R"  # helper -> keytap: readers running (errno)
_CANDIDATE = b"C"  # helper -> keytap: (id, pid), with the event's fd
_VERDICT = b"V"  # keytap -> helper: (id, ignore-mark it?)
_ROOT = b"A"  # keytap -> helper: (seq) + path of a file system to mark
_MARKED = b"M"  # helper -> keytap: (seq, errno)
_QUERY = b"Q"  # keytap -> helper: (seq)
_STATS = b"S"  # helper -> keytap: (seq) + JSON
_ID = struct.Struct("=Qi")
_VERDICT_BODY = struct.Struct("=QB")
_SEQ = struct.Struct("=Q")
_ERRNO = struct.Struct("=Qi")

READERS = 2
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}
_KCMP_VM = 1
BUCKETS_US = (100, 200, 500, 1000, 2000, 5000, 10_000, 50_000, 200_000, 1_000_000)


@dataclass(frozen=True)
class OpenedFile:
    """A file an in-scope task is opening; the task waits until `inspect` returns."""

    fd: int  # open on the file during the call (read it, or open `path`)
    pid: int  # the opener, blocked in open()/execve(): /proc/PID/root is its root
    name: str  # the kernel's name (readlink of fd): may belong to another mount namespace or
    # to an overlay layer's mount, so it is for display only; never open it

    @property
    def path(self) -> Path:
        """Opens exactly this file (whatever namespace it is in) while the call lasts."""
        return Path(f"/proc/self/fd/{self.fd}")


@dataclass(frozen=True)
class GateStats:
    """What the gate did; waits are from the helper's read() to its answer, in microseconds."""

    events: int = 0  # permission events answered
    own: int = 0  # keytap's and the helper's own opens, answered at once
    not_elf: int = 0
    no_tls: int = 0
    unreadable: int = 0  # the pre-filter could not read the file: allowed, unmarked
    candidates: int = 0  # ELF files naming SSL_do_handshake, handed to keytap
    out_of_scope: int = 0
    inspected: int = 0  # inspect() returned: ignore-marked
    already_inspected: int = 0  # queued before the ignore mark took effect, or evicted
    inspect_errors: int = 0
    timeouts: int = 0  # keytap did not answer within max_hold: allowed
    ignored: int = 0  # ignore marks added
    held_p50_us: float = 0.0
    held_p99_us: float = 0.0
    held_max_us: float = 0.0
    fast_p50_us: float = 0.0
    fast_p99_us: float = 0.0
    histogram: dict[str, int] = field(default_factory=dict)  # held waits, "<=N us" buckets
    last_error: str | None = None


class LaunchGate:
    """Holds an in-scope task that opens a file keytap has not inspected, until keytap has.

    `inspect(opened)` runs in the gate's thread and must return once the file's probes are
    attached (or it decided there are none); it may open files by path. If it raises, the task
    is allowed and the file stays unmarked, so its next open asks again. Create the gate from
    a thread that outlives it.
    """

    def __init__(self, roots: Iterable[Path], inspect: Callable[[OpenedFile], None],
                 in_scope: Callable[[int], bool], *, max_hold: float = 1.0,
                 start_timeout: float = 10.0) -> None:
        from keytap.errors import KeytapError  # not at the top: the helper imports stdlib only

        self._inspect = inspect
        self._in_scope = in_scope
        self._send_lock = threading.Lock()
        self._replies: dict[int, tuple[threading.Event, list[bytes]]] = {}
        self._seq = 0
        self._done: set[tuple[int, int, int, int]] = set()
        self._counts: collections.Counter[str] = collections.Counter()
        self._last_error: str | None = None
        self._marked: set[int] = set()  # st_dev of file systems marked
        self._closed = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        try:
            self._helper = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__, str(theirs.fileno()), str(os.getpid()),
                 str(max_hold)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        ours.settimeout(start_timeout)
        try:
            ready = ours.recv(64)
        except OSError as error:
            ready = b""
            self._last_error = str(error)
        code = _ERRNO.unpack(ready[1:])[1] if ready[:1] == _READY else -1
        if code != 0:
            self._stop_helper()
            why = os.strerror(code) if code > 0 else "its helper did not start"
            raise KeytapError(f"launch gate: fanotify unavailable ({why}): it needs root and "
                              "a kernel with CONFIG_FANOTIFY_ACCESS_PERMISSIONS")
        ours.settimeout(None)
        # A held task waits for these threads, and a thread that wants the GIL gets it only
        # after the switch interval (5 ms by default) while keytap's loop runs Python: once
        # per GIL release in inspect() (every read). They are idle but for held tasks, so a
        # short interval costs the loop nothing otherwise.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        # Two threads: replies to add_root()/stats() must get through while inspect() runs
        # (it may call them).
        self._work: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._receive, name="keytap-launch-gate-rx", daemon=True),
            threading.Thread(target=self._decide, name="keytap-launch-gate", daemon=True)]
        for thread in self._threads:
            thread.start()
        try:
            for root in roots:
                self.add_root(root)
        except BaseException:
            self.close()
            raise

    @property
    def alive(self) -> bool:
        """False once the helper is gone (the kernel then lets everything through)."""
        return not self._closed and self._helper.poll() is None

    def add_root(self, root: Path) -> None:
        """Mark the file system(s) behind `root` (for an overlay: its layers' file systems)."""
        from keytap.errors import KeytapError

        try:
            targets = [(target, os.stat(target).st_dev) for target in backing_filesystems(root)]
        except OSError as error:  # e.g. an overlay whose layers this mount namespace lacks
            raise KeytapError(f"launch gate: cannot watch {root}: {error.strerror}") from None
        for target, dev in targets:
            if dev in self._marked:
                continue
            code = self._mark(target)
            if code:
                raise KeytapError(f"launch gate: cannot watch {target}: {os.strerror(code)}")
            self._marked.add(dev)

    def stats(self, timeout: float = 5.0) -> GateStats:
        """The helper's counters and waits plus this side's decisions."""
        reply = self._request(_QUERY, b"", timeout) if self.alive else None
        helper = json.loads(reply) if reply else {}
        ours = {k: self._counts[k] for k in ("out_of_scope", "inspected", "already_inspected",
                                             "inspect_errors")}
        return GateStats(**helper, **ours, last_error=self._last_error)

    def close(self) -> None:
        """Stop: the helper exits and the kernel allows whatever is pending."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._stop_helper()
        for thread in self._threads:
            if thread.ident != threading.get_ident():
                thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> LaunchGate:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- keytap side -----------------------------------------------------------------------

    def _mark(self, path: Path, stacked: bool = False) -> int:
        """errno of marking `path`'s file system in the helper (stacked: skip the overlay
        refusal, for the test of the nested-event reader)."""
        reply = self._request(_ROOT, (b"!" if stacked else b"") + os.fsencode(path), 10.0)
        if reply is None:
            return errno.EPIPE
        return _ERRNO.unpack(reply)[1]

    def _request(self, kind: bytes, body: bytes, timeout: float) -> bytes | None:
        with self._send_lock:
            self._seq += 1
            seq = self._seq
            waiter: tuple[threading.Event, list[bytes]] = (threading.Event(), [])
            self._replies[seq] = waiter
            try:
                self._sock.send(kind + _SEQ.pack(seq) + body)
            except OSError:
                self._replies.pop(seq, None)
                return None
        if not waiter[0].wait(timeout):
            self._replies.pop(seq, None)
            return None
        return waiter[1][0] if waiter[1] else None

    def _receive(self) -> None:
        while True:
            try:
                message, fds, _flags, _addr = socket.recv_fds(self._sock, 1 << 16, 1)
            except OSError:
                message, fds = b"", []
            if not message:
                for event, _ in list(self._replies.values()):
                    event.set()
                self._work.put(None)
                return
            kind, body = message[:1], message[1:]
            if kind == _CANDIDATE and fds:
                self._work.put((*_ID.unpack(body), fds.pop(0)))
            elif kind in (_MARKED, _STATS):
                seq = _SEQ.unpack_from(body)[0]
                waiter = self._replies.pop(seq, None)
                if waiter is not None:
                    waiter[1].append(body if kind == _MARKED else body[_SEQ.size:])
                    waiter[0].set()
            for extra in fds:
                os.close(extra)

    def _decide(self) -> None:
        while (item := self._work.get()) is not None:
            self._candidate(*item)

    def _candidate(self, ident: int, pid: int, fd: int) -> None:
        ignore = False
        try:
            try:
                in_scope = self._in_scope(pid)
            except OSError:  # gone (SIGKILLed while held)
                in_scope = False
            if not in_scope:
                self._counts["out_of_scope"] += 1
                return
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if key in self._done:
                self._counts["already_inspected"] += 1
                ignore = True
                return
            name = os.readlink(f"/proc/self/fd/{fd}")
            self._inspect(OpenedFile(fd, pid, name))
            self._done.add(key)
            self._counts["inspected"] += 1
            ignore = True
        except Exception as error:  # the task must go on whatever inspect does
            self._counts["inspect_errors"] += 1
            self._last_error = f"{type(error).__name__}: {error}"
        finally:
            os.close(fd)
            with self._send_lock, contextlib.suppress(OSError):
                self._sock.send(_VERDICT + _VERDICT_BODY.pack(ident, ignore))

    def _stop_helper(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        try:
            self._helper.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._helper.kill()
            self._helper.wait()


def backing_filesystems(root: Path) -> list[Path]:
    """Directories whose file systems hold `root`'s files: `root`, or an overlay's layers.

    An overlay's layers are read from the mountinfo of the namespace `root` belongs to
    (/proc/PID/root → /proc/PID/mountinfo) and resolved in ours, as the mounter (containerd,
    in the host's namespace) named them. Raises OSError if a layer cannot be found.
    """
    if fs_type(root) != OVERLAYFS_MAGIC:
        return [root]
    parts = root.parts
    info = (Path(*parts[:3], "mountinfo") if len(parts) > 3 and parts[1] == "proc"
            and parts[2].isdigit() and parts[3] == "root" else Path("/proc/self/mountinfo"))
    dev = os.stat(root).st_dev
    for line in info.read_text(errors="surrogateescape").splitlines():
        fields = line.split(" - ", 1)
        major, minor = fields[0].split()[2].split(":")
        if os.makedev(int(major), int(minor)) != dev or len(fields) < 2:
            continue
        layers = _overlay_layers(fields[1].split(maxsplit=2)[2])
        if not layers:
            break
        result: list[Path] = []
        for layer in layers:
            if not os.path.isdir(layer):
                raise OSError(errno.ENOENT, f"overlay layer {layer} of {root} not found here")
            result.extend(p for p in backing_filesystems(Path(layer)) if p not in result)
        return result
    raise OSError(errno.ENOENT, f"no overlay layers found for {root} in {info}")


def _overlay_layers(options: str) -> list[str]:
    """lowerdir/upperdir/datadir paths from an overlay's super options in mountinfo."""
    layers: list[str] = []
    for option in _split_unescaped(_unmangle(options), ","):
        key, _, value = option.partition("=")
        if key in ("lowerdir", "lowerdir+", "datadir+", "upperdir"):
            values = _split_unescaped(value, ":") if key == "lowerdir" else [value]
            layers.extend(v.replace("\\", "") for v in values if v)
    return layers


def _unmangle(text: str) -> str:
    """mountinfo's octal escapes (\\040 for a space) back to characters."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 4].isdigit() and len(text[i + 1:i + 4]) == 3:
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            current.append(text[i:i + 2])
            i += 2
            continue
        if text[i] == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def fs_type(path: Path) -> int:
    """statfs(2)'s f_type (the magic number of the file system `path` is on)."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first long
    if _libc().statfs(os.fsencode(path), buffer) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))
    return int(ctypes.c_long.from_buffer(buffer).value)


def classify(fd: int) -> str:
    """NOT_ELF, NO_TLS or TLS (an ELF whose string tables hold one of NEEDLES)."""
    head = os.pread(fd, 64, 0)
    if head[:4] != b"\x7fELF" or len(head) < (64 if head[4:5] == b"\x02" else 52):
        return NOT_ELF
    file_size = os.fstat(fd).st_size
    order = "<" if head[5] == 1 else ">"
    if head[4] == 2:
        shoff, shentsize, shnum = struct.unpack_from(order + "Q10xHH", head, 0x28)
        layout = struct.Struct(order + "4xI16xQQ")  # sh_type, sh_offset, sh_size
    else:
        shoff, shentsize, shnum = struct.unpack_from(order + "I10xHH", head, 0x20)
        layout = struct.Struct(order + "4xI8xII")
    table = os.pread(fd, shentsize * shnum, shoff) if shoff and shnum else b""
    if shnum == 0 or shentsize < layout.size or len(table) < shentsize * shnum:
        return _scan_whole(fd)  # no usable section headers: look everywhere
    for index in range(shnum):
        sh_type, offset, size = layout.unpack_from(table, index * shentsize)
        if sh_type != _SHT_STRTAB or not size or offset + size > file_size:
            continue
        data = os.pread(fd, size, offset)
        if any(needle in data for needle in NEEDLES):
            return TLS
    return NO_TLS


def _scan_whole(fd: int) -> str:
    offset, tail = 0, b""
    while chunk := os.pread(fd, _CHUNK, offset):
        if any(needle in tail + chunk for needle in NEEDLES):
            return TLS
        tail = chunk[-(max(map(len, NEEDLES)) - 1):]
        offset += len(chunk)
    return NO_TLS


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                       ctypes.c_int, ctypes.c_char_p]
        libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        _LIBC = libc
    return _LIBC


# --- the helper process ----------------------------------------------------------------------
# Once a file system is marked, nothing here may open a file: the thread would wait for itself.
# Everything is imported before that, and errors are written without a traceback (formatting
# one reads the source files).


class _Answerer:
    """The fanotify group: reader threads answer what they can, keytap decides the rest."""

    def __init__(self, sock: socket.socket, owner: int, max_hold: float) -> None:
        self._sock = sock
        self._owner = owner
        self._own = frozenset({owner, os.getpid()})
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._kcmp = _SYS_KCMP.get(os.uname().machine)
        self._max_hold_ns = int(max_hold * 1e9)
        self._lock = threading.Lock()
        self._holds: dict[int, tuple[int, int]] = {}  # id -> (fd, read time ns)
        self._next_id = 0
        self._counts: collections.Counter[str] = collections.Counter()
        self._held: collections.deque[int] = collections.deque(maxlen=100_000)
        self._fast: collections.deque[int] = collections.deque(maxlen=100_000)
        self._histogram = [0] * (len(BUCKETS_US) + 1)
        self._marked: set[int] = set()
        libc = _libc()
        self._mark = libc.fanotify_mark
        self._syscall = libc.syscall
        flags = FAN_CLOEXEC | FAN_CLASS_CONTENT | FAN_UNLIMITED_QUEUE | FAN_UNLIMITED_MARKS
        event_flags = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC | os.O_NOATIME
        self.fan = libc.fanotify_init(flags, event_flags)
        self.error = ctypes.get_errno() if self.fan < 0 else 0

    def read_events(self) -> None:
        """One reader thread: answer, ignore-mark or hand over every event it reads."""
        while True:
            try:
                data = os.read(self.fan, 4096 * 4)
            except InterruptedError:
                continue
            now = time.monotonic_ns()
            offset = 0
            while offset + _EVENT.size <= len(data):
                length, version, _, _, mask, fd, pid = _EVENT.unpack_from(data, offset)
                offset += max(length, _EVENT.size)
                if version != _METADATA_VERSION:
                    _die("unexpected fanotify metadata version")
                self._event(mask, fd, pid, now)

    def _event(self, mask: int, fd: int, pid: int, read_ns: int) -> None:
        if fd < 0 or mask & FAN_Q_OVERFLOW:
            self._count("overflow" if mask & FAN_Q_OVERFLOW else "no_fd")
            return
        if pid in self._own:
            self._answer(fd, read_ns, False, "own")
            return
        try:
            verdict = classify(fd)
        except Exception:  # unreadable or malformed: never let input stop the helper
            verdict = "unreadable"
        if verdict != TLS:
            self._answer(fd, read_ns, verdict != "unreadable", verdict)
            return
        if self._shares_owner_memory(pid):
            self._answer(fd, read_ns, False, "own")  # a vfork child of keytap's: see below
            return
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            self._holds[ident] = (fd, read_ns)
            self._counts["candidates"] += 1
        os.eventfd_write(self._wake, 1)  # the control thread's poll has a new deadline
        try:
            socket.send_fds(self._sock, [_CANDIDATE + _ID.pack(ident, pid)], [fd])
        except OSError:  # keytap gone: the control thread is about to exit
            self._release(ident, False, "timeouts")

    def _shares_owner_memory(self, pid: int) -> bool:
        """Whether `pid` is a vfork child of keytap's, exec()ing: CPython's subprocess
        vforks holding the GIL, so no keytap thread can answer until that exec returns."""
        if self._kcmp is None:
            return False
        args = (self._kcmp, self._owner, pid, _KCMP_VM, 0, 0)
        return int(self._syscall(*(ctypes.c_long(a) for a in args))) == 0

    def _answer(self, fd: int, read_ns: int, ignore: bool, what: str, held: bool = False
                ) -> None:
        if ignore:
            flags = FAN_MARK_ADD | FAN_MARK_IGNORED_MASK | FAN_MARK_EVICTABLE
            if self._mark(self.fan, flags, FAN_OPEN_PERM, fd, None) == 0:
                self._count("ignored")
        with contextlib.suppress(OSError):
            os.write(self.fan, _RESPONSE.pack(fd, FAN_ALLOW))
        waited = time.monotonic_ns() - read_ns
        os.close(fd)
        with self._lock:
            self._counts["events"] += 1
            self._counts[what] += 1
            if held:
                self._held.append(waited)
                bucket = next((i for i, top in enumerate(BUCKETS_US) if waited <= top * 1000),
                              len(BUCKETS_US))
                self._histogram[bucket] += 1
            else:
                self._fast.append(waited)

    def _release(self, ident: int, ignore: bool, what: str) -> None:
        with self._lock:
            hold = self._holds.pop(ident, None)
        if hold is not None:
            self._answer(hold[0], hold[1], ignore, what, held=True)

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def control(self, owner_fd: int) -> None:
        """Keytap's verdicts and requests; expire holds; return when keytap is gone."""
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(owner_fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while True:
            with self._lock:
                deadline = min((t for _, t in self._holds.values()), default=None)
            timeout = None
            if deadline is not None:
                timeout = max(0, (deadline + self._max_hold_ns - time.monotonic_ns()) // 10**6 + 1)
            for fd, _ in poller.poll(timeout):
                if fd == owner_fd:
                    return
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                    continue
                message = self._sock.recv(1 << 16)
                if not message:
                    return
                self._command(message)
            self._expire()

    def _command(self, message: bytes) -> None:
        kind, body = message[:1], message[1:]
        if kind == _VERDICT:
            ident, ignore = _VERDICT_BODY.unpack(body)
            self._release(ident, bool(ignore), "decided")
        elif kind == _ROOT:
            seq, path = _SEQ.unpack_from(body)[0], body[_SEQ.size:]
            self._sock.send(_MARKED + _ERRNO.pack(seq, self._mark_filesystem(path)))
        elif kind == _QUERY:
            seq = _SEQ.unpack_from(body)[0]
            self._sock.send(_STATS + _SEQ.pack(seq) + json.dumps(self._stats()).encode())

    def _mark_filesystem(self, path: bytes) -> int:
        stacked = path.startswith(b"!")
        path = path.removeprefix(b"!")
        try:
            if not stacked and fs_type(Path(os.fsdecode(path))) == OVERLAYFS_MAGIC:
                return errno.EXDEV  # see the module docstring: mark its layers instead
            dev = os.stat(path).st_dev
        except OSError as error:
            return error.errno or errno.EIO
        if dev in self._marked:
            return 0
        if self._mark(self.fan, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_OPEN_PERM, AT_FDCWD,
                      path) != 0:
            return ctypes.get_errno()
        self._marked.add(dev)
        return 0

    def _expire(self) -> None:
        now = time.monotonic_ns()
        with self._lock:
            late = [i for i, (_, t) in self._holds.items() if now - t >= self._max_hold_ns]
        for ident in late:
            self._release(ident, False, "timeouts")

    def _stats(self) -> dict[str, object]:
        with self._lock:
            counts = dict(self._counts)
            held, fast = sorted(self._held), sorted(self._fast)
            histogram = list(self._histogram)
        labels = [f"<={top}us" for top in BUCKETS_US] + [f">{BUCKETS_US[-1]}us"]
        result: dict[str, object] = {
            k: counts.get(k, 0) for k in ("events", "own", "not_elf", "no_tls", "unreadable",
                                          "candidates", "timeouts", "ignored")}
        result.update(held_p50_us=_percentile(held, 50), held_p99_us=_percentile(held, 99),
                      held_max_us=held[-1] / 1000 if held else 0.0,
                      fast_p50_us=_percentile(fast, 50), fast_p99_us=_percentile(fast, 99),
                      histogram={label: n for label, n in zip(labels, histogram, strict=True)
                                 if n})
        return result


def _percentile(ordered: list[int], pct: int) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, len(ordered) * pct // 100)] / 1000


def _die(message: str) -> None:
    """No traceback (it would read source files): say it and exit; the kernel allows all."""
    with contextlib.suppress(OSError):
        os.write(2, f"keytap launch gate helper: {message}\n".encode(errors="replace"))
    os._exit(70)


def _serve(sock_fd: int, owner: int, max_hold: float) -> None:
    """The helper's main: watch the owner, start readers, then take commands."""
    sys.excepthook = lambda kind, value, _tb: _die(f"{kind.__name__}: {value}")
    threading.excepthook = lambda args: _die(f"{args.exc_type.__name__}: {args.exc_value}")
    for signum in (signal.SIGINT, signal.SIGTSTP, signal.SIGHUP, signal.SIGQUIT,
                   signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_IGN)
    import resource  # every held event is an open fd; EMFILE would make the kernel deny opens

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sock = socket.socket(fileno=sock_fd)
    try:
        owner_fd = os.pidfd_open(owner)
    except OSError:
        os._exit(0)
    if os.getppid() != owner:
        os._exit(0)  # the owner died before we watched it
    answerer = _Answerer(sock, owner, max_hold)
    if answerer.error:
        sock.send(_READY + _ERRNO.pack(0, answerer.error))
        os._exit(0)
    for index in range(READERS):
        threading.Thread(target=answerer.read_events, name=f"reader{index}",
                         daemon=True).start()
    sock.send(_READY + _ERRNO.pack(0, 0))
    answerer.control(owner_fd)
    os._exit(0)  # closing the group allows every pending event


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
