"""Uprobes that carry a BPF cookie, so that one program serves every file it is attached to.

BCC 0.26 attaches uprobes without a cookie, so a program could tell which library (or Go
binary) fired only by being a separate copy per library: 16 copies of each compiled at every
start, most of keytap's start-up time in LLVM. Here the program reads the cookie with
bpf_get_attach_cookie(), and the probes are BPF links made by hand (`kernel.syscalls`: BCC's
attach takes no cookie, and libbpf has no Python binding in Debian or on PyPI):

- Linux 6.6+: one uprobe_multi link per program and file, every offset of that file in it.
  Detaching costs one wait for the kernel's grace periods per link, and links detach in
  parallel (measured here: 30 links closed in 0.1 s);
- older kernels (5.15+): a perf event of the `uprobe` PMU per probe, linked with
  BPF_LINK_CREATE. Each detach waits for its grace periods under a global mutex (~190 ms
  each here, one after the other: 1,400 probes took keytap 150 s to exit).

A link holds its probes: closing its fd detaches them, also when keytap dies.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from keytap.kernel import syscalls
from keytap.kernel.btf import kernel_facts
from keytap.kernel.loader import import_bcc

PMU = Path("/sys/bus/event_source/devices/uprobe")
BPF_PERF_EVENT, BPF_TRACE_UPROBE_MULTI = 41, 48  # enum bpf_attach_type
BPF_F_UPROBE_MULTI_RETURN = 1
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_ATTR_SIZE_VER5 = 112
CLOSING_THREADS = 64  # links detached at once (each mostly waits for a grace period)


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


class _MultiLinkAttr(ctypes.Structure):
    """`union bpf_attr`'s link_create member for BPF_TRACE_UPROBE_MULTI."""

    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("path", ctypes.c_uint64), ("offsets", ctypes.c_uint64),
                ("ref_ctr_offsets", ctypes.c_uint64), ("cookies", ctypes.c_uint64),
                ("cnt", ctypes.c_uint32), ("multi_flags", ctypes.c_uint32),
                ("pid", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


@dataclass(frozen=True)
class Program:
    """A loaded uprobe program, and whether it takes uprobe_multi links."""

    fd: int
    multi: bool


@dataclass(frozen=True)
class Probe:
    """One uprobe of a file: which program, at which file offset, on entry or return."""

    program: Program
    offset: int
    retprobe: bool = False


def load(bpf: Any, name: str) -> Program:
    """Load a program of a BCC object for uprobe_multi links, or where the kernel has none
    (before 6.6) for perf-event links. Whether it has them is asked of its BTF rather than
    tried: BCC prints the kernel's refusal of a load to stderr."""
    bcc = import_bcc()
    if kernel_facts().uprobe_multi:
        return Program(bpf.load_func(name.encode(), bcc.BPF.KPROBE,
                                     attach_type=BPF_TRACE_UPROBE_MULTI).fd, True)
    return Program(bpf.load_func(name.encode(), bcc.BPF.KPROBE).fd, False)


@functools.cache
def _pmu() -> tuple[int, int]:
    """The uprobe PMU's type and its retprobe bit (from its sysfs format: `config:0`)."""
    try:
        pmu_type = int((PMU / "type").read_text())
        bit = int((PMU / "format" / "retprobe").read_text().split(":")[1])
    except (OSError, ValueError, IndexError) as error:
        raise OSError(errno.ENOSYS, f"no uprobe PMU in sysfs ({error})") from None
    return pmu_type, 1 << bit


def multi_link(program_fd: int, path: bytes, offsets: list[int], cookie: int,
               retprobe: bool) -> int:
    """One uprobe_multi link: the program at every offset of the file, for every process."""
    path_buffer = ctypes.create_string_buffer(path)
    offset_array = (ctypes.c_uint64 * len(offsets))(*offsets)
    cookie_array = (ctypes.c_uint64 * len(offsets))(*[cookie] * len(offsets))
    attr = _MultiLinkAttr(prog_fd=program_fd, attach_type=BPF_TRACE_UPROBE_MULTI,
                          path=ctypes.addressof(path_buffer),
                          offsets=ctypes.addressof(offset_array),
                          cookies=ctypes.addressof(cookie_array), cnt=len(offsets),
                          multi_flags=BPF_F_UPROBE_MULTI_RETURN if retprobe else 0)
    return syscalls.bpf_link_create(attr)


def perf_link(program_fd: int, path: bytes, offset: int, cookie: int, retprobe: bool) -> int:
    """One perf-event link: the program at one offset of the file, for every process."""
    pmu_type, retprobe_bit = _pmu()
    path_buffer = ctypes.create_string_buffer(path)
    attr = _PerfEventAttr(type=pmu_type, size=PERF_ATTR_SIZE_VER5,
                          config=retprobe_bit if retprobe else 0,
                          config1=ctypes.addressof(path_buffer), config2=offset)
    # pid -1 and cpu 0: every process; a probe's program runs on whichever CPU the hit is.
    event = syscalls.perf_event_open(attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    try:
        link = _PerfLinkAttr(prog_fd=program_fd, target_fd=event, attach_type=BPF_PERF_EVENT,
                             bpf_cookie=cookie)
        link_fd = syscalls.bpf_link_create(link)
        try:
            fcntl.ioctl(event, PERF_EVENT_IOC_ENABLE, 0)
        except OSError:
            os.close(link_fd)
            raise
        return link_fd
    finally:
        os.close(event)  # the link holds the event from here on


class Links:
    """The uprobe links of one owner (a key source): attached file by file, closed together."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def attach(self, path: Path, cookie: int, probes: Iterable[Probe]) -> None:
        """Attach `probes` to the file with `cookie`, in order (a multi program's probes in
        one link). Raises OSError at the first link that fails; those made before it stay
        (they read what they can)."""
        name = os.fsencode(path)
        for (program, retprobe), same in groupby(probes, lambda p: (p.program, p.retprobe)):
            offsets = [probe.offset for probe in same]
            if program.multi:
                self._fds.append(multi_link(program.fd, name, offsets, cookie, retprobe))
                continue
            for offset in offsets:
                self._fds.append(perf_link(program.fd, name, offset, cookie, retprobe))

    def close(self) -> None:
        """Detach every probe. Each link's close waits for the kernel's grace periods, so
        they are closed from many threads (uprobe_multi links then wait together)."""
        fds, self._fds = self._fds, []
        if fds:
            with ThreadPoolExecutor(min(CLOSING_THREADS, len(fds))) as pool:
                list(pool.map(os.close, fds))
