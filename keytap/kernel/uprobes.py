"""Uprobes that carry a BPF cookie, so that one program serves every file it is attached to.

BCC 0.26 attaches uprobes without a cookie, so a program could tell which library (or Go
binary) fired only by being a separate copy per library: 16 copies of each compiled at every
start, most of keytap's start-up time in LLVM. Here a uprobe is a perf event of the kernel's
`uprobe` PMU (perf_event_open(2): the file's path and offset) bound to the program by
BPF_LINK_CREATE with a cookie, which the program reads with bpf_get_attach_cookie() (Linux
5.15+). The link holds the event: closing its fd detaches the probe, also when keytap dies.
Written by hand on ctypes because no package does this from Python: BCC's attach takes no
cookie, and libbpf has no Python binding in Debian or on PyPI.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from keytap.kernel.loader import import_bcc

PMU = Path("/sys/bus/event_source/devices/uprobe")
PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
BPF_LINK_CREATE = 28
BPF_PERF_EVENT = 41  # enum bpf_attach_type
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_ATTR_SIZE_VER5 = 112

_libc = ctypes.CDLL(None, use_errno=True)


class _PerfEventAttr(ctypes.Structure):
    """`struct perf_event_attr` up to config2 (probes need no more), padded to VER5's size."""

    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("config", ctypes.c_uint64), ("sample_period", ctypes.c_uint64),
                ("sample_type", ctypes.c_uint64), ("read_format", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64),
                ("config2", ctypes.c_uint64), ("_rest", ctypes.c_uint8 * 40)]


class _PerfLinkAttr(ctypes.Structure):
    """`union bpf_attr`'s link_create member for BPF_PERF_EVENT."""

    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("bpf_cookie", ctypes.c_uint64)]


def _syscall(table: dict[str, int], *args: object) -> int:
    number = table.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"system call number unknown on {platform.machine()}")
    result = _libc.syscall(number, *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _pmu() -> tuple[int, int]:
    """The uprobe PMU's type and its retprobe bit (from its sysfs format: `config:0`)."""
    try:
        pmu_type = int((PMU / "type").read_text())
        bit = int((PMU / "format" / "retprobe").read_text().split(":")[1])
    except (OSError, ValueError, IndexError) as error:
        raise OSError(errno.ENOSYS, f"no uprobe PMU in sysfs ({error})") from None
    return pmu_type, 1 << bit


def attach(prog_fd: int, path: bytes, offset: int, cookie: int, retprobe: bool = False) -> int:
    """Attach the program at `offset` (a file offset) of the file at `path`, for every
    process, with `cookie`; returns the link's fd (close it to detach). Raises OSError."""
    pmu_type, retprobe_bit = _pmu()
    path_buffer = ctypes.create_string_buffer(path)
    attr = _PerfEventAttr(type=pmu_type, size=PERF_ATTR_SIZE_VER5,
                          config=retprobe_bit if retprobe else 0,
                          config1=ctypes.addressof(path_buffer), config2=offset)
    # pid -1 and cpu 0: every process; a probe's program runs on whichever CPU the hit is.
    event = _syscall(PERF_EVENT_OPEN, ctypes.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    try:
        link = _PerfLinkAttr(prog_fd=prog_fd, target_fd=event, attach_type=BPF_PERF_EVENT,
                             bpf_cookie=cookie)
        link_fd = _syscall(BPF_SYSCALL, BPF_LINK_CREATE, ctypes.byref(link),
                           ctypes.sizeof(link))
        try:
            fcntl.ioctl(event, PERF_EVENT_IOC_ENABLE, 0)
        except OSError:
            os.close(link_fd)
            raise
        return link_fd
    finally:
        os.close(event)  # the link holds the event from here on


@dataclass(frozen=True)
class Probe:
    """One uprobe of a file: where (a symbol, or an ELF virtual address) and which program."""

    program_fd: int
    symbol: str | None = None
    address: int | None = None
    retprobe: bool = False


def file_offset(path: bytes, symbol: str | None, address: int | None) -> int:
    """The file offset of a symbol (or an ELF virtual address) that a uprobe takes, by BCC's
    resolver (the dynamic and static symbol tables, and the load segments)."""
    try:
        _module, offset = import_bcc().BPF._check_path_symbol(
            path, symbol.encode() if symbol else None, address, -1)
    except Exception as error:  # BCC raises bare Exception
        raise OSError(errno.ENOENT, str(error)) from None
    return offset


class Links:
    """The uprobe links of one owner (a key source): attached file by file, closed together."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def attach(self, path: Path, cookie: int, probes: Iterable[Probe]) -> None:
        """Attach `probes` to the file, in order, with `cookie`. Raises OSError at the first
        that fails; those attached before it stay (they read what they can)."""
        name = os.fsencode(path)
        for probe in probes:
            offset = file_offset(name, probe.symbol, probe.address)
            self._fds.append(attach(probe.program_fd, name, offset, cookie, probe.retprobe))

    def close(self) -> None:
        """Detach every probe (each close waits for the kernel to unregister it)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
