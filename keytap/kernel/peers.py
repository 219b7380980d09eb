"""Which network namespaces an interface leads into, and which interfaces lead into one.

A pod's host-side veth (or netkit) names its peer's namespace only as a netnsid relative to
ours (IFLA_LINK_NETNSID); these match netnsids to the namespaces processes and /run/netns
hold. Used for the key scope (-i), and to find a pod's interfaces (--pid, --netns, --pod).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Link kinds whose peer end is the "far side" of the interface.
_PAIR_KINDS = frozenset({"veth", "netkit"})
_NSID_NOT_ASSIGNED = (-1, 0xFFFFFFFF)


def netns_id(pid: int) -> int:
    """Identity of the network namespace of `pid`: the inode of /proc/PID/ns/net."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def all_pids() -> Iterator[int]:
    """Every process's pid (threads not listed)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def peer_netns_ids(ifname: str) -> set[int]:
    """Network namespaces at the far end of `ifname` (a veth/netkit in keytap's namespace).

    The kernel tells the peer's namespace only as a netnsid relative to ours
    (IFLA_LINK_NETNSID); it is matched to a namespace by asking RTM_GETNSID for each
    namespace that a process or /run/netns holds. An interface whose peer is in our own
    namespace, or that is not a pair at all (lo, eth0), gives our own namespace.
    Raises LookupError if there is no such interface.
    """
    from pyroute2 import IPRoute  # netlink only here; keeps the module importable without it

    own = {netns_id(os.getpid())}
    with IPRoute() as ipr:
        indexes = ipr.link_lookup(ifname=ifname)
        if not indexes:
            raise LookupError(f"no network interface named {ifname!r}")
        link = ipr.get_links(indexes[0])[0]
        kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        nsid = link.get("IFLA_LINK_NETNSID")
        if kind not in _PAIR_KINDS or nsid is None or nsid in _NSID_NOT_ASSIGNED:
            return own
        found = set()
        for inode, handle in _namespace_handles():
            try:
                fd = os.open(handle, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                reply = ipr.get_netnsid(fd=fd)
            finally:
                os.close(fd)
            if reply is not None and reply.get("nsid") == nsid:
                found.add(inode)
        return found


def host_peers(netns: str) -> list[str]:
    """Interfaces of keytap's namespace whose peer end is in the network namespace that the
    path `netns` opens (/proc/PID/ns/net, /run/netns/NAME): a pod's host-side veths/netkits.

    The inverse of peer_netns_ids, by the same netnsid: dumping the links first makes the
    kernel assign one to every peer namespace. Raises OSError if `netns` cannot be opened.
    """
    from pyroute2 import IPRoute

    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with IPRoute() as ipr:
            links = ipr.get_links()
            reply = ipr.get_netnsid(fd=fd)
    finally:
        os.close(fd)
    nsid = reply.get("nsid") if reply is not None else None
    if nsid is None or nsid in _NSID_NOT_ASSIGNED:
        return []
    return sorted(link.get_attr("IFLA_IFNAME") for link in links
                  if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") in _PAIR_KINDS
                  and link.get("IFLA_LINK_NETNSID") == nsid)


def _namespace_handles() -> Iterator[tuple[int, str]]:
    """(netns inode, a path that opens it) for every network namespace we can see, once each."""
    seen: set[int] = set()
    candidates = [f"/proc/{pid}/ns/net" for pid in all_pids()]
    with contextlib.suppress(OSError):  # /run/netns: namespaces named by `ip netns add`
        candidates += [entry.path for entry in os.scandir("/run/netns")]
    for handle in candidates:
        try:
            inode = os.stat(handle).st_ino
        except OSError:
            continue
        if inode not in seen:
            seen.add(inode)
            yield inode, handle
