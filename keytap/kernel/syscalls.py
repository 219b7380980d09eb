"""The two system calls keytap makes by hand: bpf(2) for BPF_LINK_CREATE and perf_event_open(2).

Neither pyroute2 (netlink only) nor BCC 0.26 creates tcx links or links with a cookie, so
keytap.kernel.tc and keytap.kernel.uprobes make them through libc's syscall().
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_NUMBERS = {"bpf": {"x86_64": 321, "aarch64": 280},
            "perf_event_open": {"x86_64": 298, "aarch64": 241}}
BPF_LINK_CREATE = 28  # enum bpf_cmd

_libc = ctypes.CDLL(None, use_errno=True)


def _call(name: str, *args: object) -> int:
    number = _NUMBERS[name].get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"{name}(2) number unknown on {platform.machine()}")
    result = _libc.syscall(number, *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def bpf_link_create(attr: ctypes.Structure) -> int:
    """bpf(BPF_LINK_CREATE, attr): the new link's fd. Raises OSError."""
    return _call("bpf", BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))


def perf_event_open(attr: ctypes.Structure, pid: int, cpu: int, group_fd: int,
                    flags: int) -> int:
    """perf_event_open(2): the event's fd. Raises OSError."""
    return _call("perf_event_open", ctypes.byref(attr), pid, cpu, group_fd, flags)
