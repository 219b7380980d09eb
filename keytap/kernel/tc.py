"""Attach keytap's classifier to clsact ingress/egress with pyroute2, and remove only that.

Other software (Cilium, Calico) keeps its own programs on the same clsact hooks, so keytap never
touches a qdisc or filter it did not create. Its filters carry their owner in the netlink name:
`keytap_<pid>` or `keytap_<pid>_own` when that keytap also created the clsact qdisc. This makes the
leftovers of a keytap that was killed recognisable at the next start, with no state file.
"""

from __future__ import annotations

import enum
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

TC_H_CLSACT = 0xFFFFFFF1
IFF_LOOPBACK = 0x8
ETH_P_ALL = 0x0003
FILTER_NAME = re.compile(r"^keytap_(?P<pid>\d+)(?P<own>_own)?$")


class Hook(enum.IntEnum):
    """clsact hook, as the filter's parent handle."""

    INGRESS = 0xFFFFFFF2
    EGRESS = 0xFFFFFFF3


class InterfaceNotFound(LookupError):
    """The interface does not exist in keytap's network namespace."""


@dataclass(frozen=True)
class TcFilter:
    """A filter as the kernel reports it."""

    ifindex: int
    hook: Hook
    prio: int
    handle: int
    kind: str
    name: str | None  # TCA_BPF_NAME for bpf filters
    protocol: int


@dataclass
class InterfaceAttachment:
    """What keytap added to one interface, so that exactly that can be removed."""

    ifindex: int
    ifname: str
    created_clsact: bool
    filters: list[TcFilter] = field(default_factory=list)


def list_filters(ipr: IPRoute, ifindex: int, hook: Hook) -> list[TcFilter]:
    """Filters on one clsact hook (empty when the interface has no clsact)."""
    try:
        messages = ipr.get_filters(ifindex, parent=int(hook))
    except NetlinkError:
        return []
    filters = []
    for message in messages:
        if not message["handle"]:
            continue  # the per-priority chain header, not a filter
        options = message.get_attr("TCA_OPTIONS")
        name = options.get_attr("TCA_BPF_NAME") if options is not None else None
        filters.append(
            TcFilter(ifindex, hook, message["info"] >> 16, message["handle"],
                     message.get_attr("TCA_KIND") or "", name,
                     socket.ntohs(message["info"] & 0xFFFF))
        )
    return filters


def has_clsact(ipr: IPRoute, ifindex: int) -> bool:
    return any(
        q["parent"] == TC_H_CLSACT or q.get_attr("TCA_KIND") == "clsact"
        for q in ipr.get_qdiscs(ifindex)
    )


def _choose_prio(existing: list[TcFilter]) -> int:
    """Run ahead of other filters: one that redirects would otherwise hide packets from us.

    At an occupied prio 1, sharing it with bpf filters still puts us first (cls_bpf inserts new
    programs at the head of its list); otherwise we can only go last.
    """
    if not existing:
        return 1
    lowest = min(f.prio for f in existing)
    if lowest > 1:
        return lowest - 1
    if all(f.kind == "bpf" and f.protocol == ETH_P_ALL for f in existing if f.prio == 1):
        return 1
    return max(f.prio for f in existing) + 1


def _delete_filter(ipr: IPRoute, f: TcFilter) -> None:
    try:
        ipr.tc("del-filter", "bpf", f.ifindex, f.handle, parent=int(f.hook), prio=f.prio,
               protocol=ETH_P_ALL)
    except NetlinkError as error:
        if error.code != 2:  # ENOENT: already gone (interface deleted, or someone else did it)
            raise


def _delete_clsact_if_empty(ipr: IPRoute, ifindex: int) -> bool:
    if any(list_filters(ipr, ifindex, hook) for hook in Hook):
        return False
    try:
        ipr.tc("del", "clsact", ifindex)
    except NetlinkError as error:
        if error.code not in (2, 22):
            raise
    return True


class TcAttacher:
    """Adds keytap's filters and removes exactly those (and a clsact it created itself)."""

    def __init__(self, ipr: IPRoute, pid: int | None = None) -> None:
        self._ipr = ipr
        self._pid = os.getpid() if pid is None else pid
        self.attachments: list[InterfaceAttachment] = []

    def ifindex(self, ifname: str) -> int:
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            raise InterfaceNotFound(ifname)
        return found[0]

    def is_loopback(self, ifindex: int) -> bool:
        return bool(self._ipr.get_links(ifindex)[0]["flags"] & IFF_LOOPBACK)

    def attach(self, ifname: str, programs: dict[Hook, int]) -> InterfaceAttachment:
        """Attach program fds to the given hooks of `ifname`."""
        ifindex = self.ifindex(ifname)
        created = not has_clsact(self._ipr, ifindex)
        if created:
            self._ipr.tc("add", "clsact", ifindex)
        attachment = InterfaceAttachment(ifindex, ifname, created)
        self.attachments.append(attachment)
        name = f"keytap_{self._pid}{'_own' if created else ''}"
        for hook, fd in programs.items():
            before = list_filters(self._ipr, ifindex, hook)
            prio = _choose_prio(before)
            handle = 1 + max((f.handle for f in before if f.prio == prio), default=0)
            self._ipr.tc("add-filter", "bpf", ifindex, handle, fd=fd, name=name,
                         parent=int(hook), classid=1, direct_action=True, prio=prio,
                         protocol=ETH_P_ALL)
            known = {(f.prio, f.handle) for f in before}
            attachment.filters += [
                f for f in list_filters(self._ipr, ifindex, hook)
                if (f.prio, f.handle) not in known and f.name == name
            ]
        return attachment

    def detach_all(self) -> None:
        """Remove what attach() added; idempotent."""
        while self.attachments:
            attachment = self.attachments.pop()
            for f in attachment.filters:
                _delete_filter(self._ipr, f)
            if attachment.created_clsact:
                _delete_clsact_if_empty(self._ipr, attachment.ifindex)


def _keytap_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"keytap" in cmdline


def remove_stale_filters(
    ipr: IPRoute, alive: Callable[[int], bool] = _keytap_alive
) -> list[str]:
    """Remove filters (and own clsacts) left by keytaps that no longer run; say where."""
    removed = []
    for link in ipr.get_links():
        ifindex, ifname = link["index"], link.get_attr("IFLA_IFNAME")
        own_clsact = False
        for hook in Hook:
            for f in list_filters(ipr, ifindex, hook):
                match = FILTER_NAME.match(f.name or "")
                if not match or alive(int(match["pid"])):
                    continue
                _delete_filter(ipr, f)
                own_clsact |= bool(match["own"])
                removed.append(f"{ifname} {hook.name.lower()} (pid {match['pid']})")
        if own_clsact:
            _delete_clsact_if_empty(ipr, ifindex)
    return removed
