"""Attach keytap's classifier ahead of every other program, and remove exactly what it added.

On kernels with tcx (6.6+) the classifier goes on tcx ingress and egress through BPF links
placed first in each chain: tcx programs run before any clsact filter, and a redirect there
(Cilium's `bpf_redirect_peer`) never reaches clsact at all. A link is released when its fd
closes, also when keytap is killed: nothing is left behind.

Older kernels get clsact filters. Other software (Cilium, Calico) keeps its own programs on the
same hooks, so keytap never touches a qdisc or filter it did not create. Its filters carry
their owner in the netlink name, `keytap_<pid>_<token>` (`..._own` when a keytap created the
clsact), and the owner holds an abstract unix socket of that name in its network namespace,
which is where every process that can see the filter lives: the kernel closes the socket when
the owner dies, so liveness needs no pid, which would mean nothing in another PID namespace.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from keytap.kernel.syscalls import bpf_link_create

TC_H_CLSACT = 0xFFFFFFF1
IFF_LOOPBACK = 0x8
ETH_P_ALL = 0x0003
FILTER_NAME = re.compile(r"^(?P<owner>keytap_(?P<pid>\d+)_[0-9a-f]{8})(?P<own>_own)?$")
GONE = (errno.ENOENT, errno.ENODEV, errno.EINVAL)  # the filter, the device, the clsact

BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47
BPF_F_BEFORE = 1 << 3  # with no relative program: ahead of every program on the hook
NO_TCX = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, 524)  # 524: ENOTSUPP (kernel-internal)


class Hook(enum.IntEnum):
    """clsact hook, as the filter's parent handle."""

    INGRESS = 0xFFFFFFF2
    EGRESS = 0xFFFFFFF3


TCX_ATTACH_TYPE = {Hook.INGRESS: BPF_TCX_INGRESS, Hook.EGRESS: BPF_TCX_EGRESS}


class InterfaceNotFound(LookupError):
    """The interface does not exist in keytap's network namespace."""


class _LinkCreateAttr(ctypes.Structure):
    """`union bpf_attr`'s link_create member, as far as tcx uses it."""

    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("relative_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("expected_revision", ctypes.c_uint64)]


def tcx_link(prog_fd: int, ifindex: int, hook: Hook) -> int:
    """A tcx link of the program on the hook, first in its chain; its fd. Raises OSError."""
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_ifindex=ifindex,
                           attach_type=TCX_ATTACH_TYPE[hook], flags=BPF_F_BEFORE)
    return bpf_link_create(attr)


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
    created_clsact: bool = False  # by this keytap, or by one whose filters it found there
    filters: list[TcFilter] = field(default_factory=list)
    links: list[int] = field(default_factory=list)  # tcx link fds
    behind: list[TcFilter] = field(default_factory=list)  # others' filters that run first


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
        if error.code not in GONE:  # already gone with its interface, or someone removed it
            raise


def _delete_clsact_if_empty(ipr: IPRoute, ifindex: int) -> bool:
    if any(list_filters(ipr, ifindex, hook) for hook in Hook):
        return False
    try:
        ipr.tc("del", "clsact", ifindex)
    except NetlinkError as error:
        if error.code not in GONE:
            raise
    return True


def _keytap_alive(owner: str) -> bool:
    """Whether the keytap named `owner` still holds its abstract socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(f"\0{owner}")
        except ConnectionRefusedError:
            return False
        except OSError:
            return True  # cannot tell: never remove a filter that may be live
    return True


class TcAttacher:
    """Adds keytap's classifier to interfaces and removes exactly what it added.

    `use_tcx=False` forces clsact (what older kernels get anyway; KEYTAP_ATTACH=clsact)."""

    def __init__(self, ipr: IPRoute, use_tcx: bool = True) -> None:
        self._ipr = ipr
        self.use_tcx = use_tcx
        self.owner = f"keytap_{os.getpid()}_{secrets.token_hex(4)}"
        self._liveness = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._liveness.bind(f"\0{self.owner}")  # released by the kernel when keytap dies
        self.attachments: list[InterfaceAttachment] = []

    def ifindex(self, ifname: str) -> int:
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            raise InterfaceNotFound(ifname)
        return found[0]

    def is_loopback(self, ifindex: int) -> bool:
        return bool(self._ipr.get_links(ifindex)[0]["flags"] & IFF_LOOPBACK)

    def attach(self, ifname: str, programs: dict[Hook, int]) -> InterfaceAttachment:
        """Attach program fds to the given hooks of `ifname`: tcx links where the kernel has
        tcx (the first refusal switches this attacher to clsact), else clsact filters."""
        attachment = InterfaceAttachment(self.ifindex(ifname), ifname)
        self.attachments.append(attachment)
        if self.use_tcx:
            try:
                for hook, fd in programs.items():
                    attachment.links.append(tcx_link(fd, attachment.ifindex, hook))
                return attachment
            except OSError as error:
                if error.errno not in NO_TCX or attachment.links:
                    raise
                self.use_tcx = False
        self._attach_clsact(attachment, programs)
        return attachment

    def _attach_clsact(self, attachment: InterfaceAttachment, programs: dict[Hook, int]) -> None:
        ifindex = attachment.ifindex
        if not has_clsact(self._ipr, ifindex):
            self._ipr.tc("add", "clsact", ifindex)
            attachment.created_clsact = True
        else:  # a keytap's clsact stays a keytap's: the last one out removes it
            attachment.created_clsact = any(
                (match := FILTER_NAME.match(f.name or "")) and match["own"]
                for hook in Hook for f in list_filters(self._ipr, ifindex, hook))
        name = f"{self.owner}{'_own' if attachment.created_clsact else ''}"
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
            attachment.behind += [f for f in before
                                  if f.prio < prio and not FILTER_NAME.match(f.name or "")]

    def lost(self, attachment: InterfaceAttachment) -> str | None:
        """Why the classifier no longer sees the interface's packets, if it does not."""
        try:
            self._ipr.get_links(attachment.ifindex)
        except NetlinkError as error:
            if error.code == errno.ENODEV:
                return "the interface was deleted"
            raise
        if attachment.filters and not all(
                f in list_filters(self._ipr, f.ifindex, f.hook) for f in attachment.filters):
            return "keytap's filters were removed (clsact deleted?)"
        return None

    def detach(self, attachment: InterfaceAttachment) -> None:
        """Remove one interface's attachment; a missing device or qdisc is no error."""
        self.attachments.remove(attachment)
        for fd in attachment.links:
            os.close(fd)
        for f in attachment.filters:
            _delete_filter(self._ipr, f)
        if attachment.created_clsact:
            _delete_clsact_if_empty(self._ipr, attachment.ifindex)

    def detach_all(self) -> None:
        """Remove what attach() added; idempotent."""
        while self.attachments:
            self.detach(self.attachments[-1])

    def close(self) -> None:
        """Detach, then give up the liveness socket."""
        self.detach_all()
        self._liveness.close()


def remove_stale_filters(
    ipr: IPRoute, alive: Callable[[str], bool] = _keytap_alive
) -> list[str]:
    """Remove filters (and own clsacts) left by keytaps that no longer run; say where."""
    removed = []
    for link in ipr.get_links():
        ifindex, ifname = link["index"], link.get_attr("IFLA_IFNAME")
        own_clsact = False
        for hook in Hook:
            for f in list_filters(ipr, ifindex, hook):
                match = FILTER_NAME.match(f.name or "")
                if not match or alive(match["owner"]):
                    continue
                _delete_filter(ipr, f)
                own_clsact |= bool(match["own"])
                removed.append(f"{ifname} {hook.name.lower()} (pid {match['pid']})")
        if own_clsact:
            _delete_clsact_if_empty(ipr, ifindex)
    return removed
