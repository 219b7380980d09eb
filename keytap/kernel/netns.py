"""Name the pod, not the veth: `--pid PID` and `--netns NAME|PATH` to the host-side interfaces
that lead into that network namespace (kernel.peers.host_peers: veth or netkit peers by
link-netnsid). Each way it can fail is one line, raised as BadInput before anything is
attached. The key scope follows from the interfaces, as for -i.
"""

from __future__ import annotations

import os
from pathlib import Path

from keytap.errors import BadInput
from keytap.kernel.peers import host_peers

RUN_NETNS = Path("/run/netns")  # where `ip netns add NAME` keeps its namespaces


def pid_interfaces(pid: int) -> tuple[str, ...]:
    """--pid: the host-side interfaces of the network namespace `pid` lives in."""
    handle = f"/proc/{pid}/ns/net"
    try:
        inode = os.stat(handle).st_ino
        command = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        raise BadInput(f"--pid {pid}: no such process") from None
    except OSError as error:
        raise BadInput(f"--pid {pid}: cannot see its network namespace "
                       f"({error.strerror})") from None
    if inode == os.stat("/proc/self/ns/net").st_ino:
        raise BadInput(f"--pid {pid} ({command}) has no network namespace of its own: it "
                       "shares keytap's (host network); capture its interfaces with -i")
    return _interfaces(handle, f"--pid {pid} ({command})")


def netns_interfaces(name: str) -> tuple[str, ...]:
    """--netns: a name of `ip netns` (/run/netns/NAME) or a path that opens a namespace."""
    handle = str(RUN_NETNS / name) if "/" not in name else name
    try:
        is_netns = os.stat(handle).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        where = "see `ip netns list`" if "/" not in name else "no such file"
        raise BadInput(f"--netns {name}: no such network namespace ({where})") from None
    if not is_netns:
        raise BadInput(f"--netns {name}: not a network namespace (give a name of `ip netns "
                       "list`, /proc/PID/ns/net or a bind mount of one)")
    if os.stat(handle).st_ino == os.stat("/proc/self/ns/net").st_ino:
        raise BadInput(f"--netns {name} is keytap's own network namespace: capture its "
                       "interfaces with -i")
    return _interfaces(handle, f"--netns {name}")


def _interfaces(handle: str, what: str) -> tuple[str, ...]:
    try:
        names = host_peers(handle)
    except OSError as error:
        raise BadInput(f"{what}: cannot open its network namespace ({error.strerror})") from None
    if not names:
        raise BadInput(f"{what}: no veth or netkit in keytap's network namespace leads into "
                       "its network namespace (nothing to capture here)")
    return tuple(names)
