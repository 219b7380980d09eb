"""Interfaces named by glob patterns (`-i 'veth*'`), those that appear during the capture too.

Netlink link events (RTM_NEWLINK on RTMGRP_LINK) say when an interface appears or is renamed
(CNI plugins create a veth under a temporary name and rename it); the subscription is made
before the first listing, so one that appears in between is not missed. Non-blocking: the
capture polls it (session.InterfaceFollower). The socket is keytap's own, parsed by pyroute2's
rtnl marshal: pyroute2's IPRoute reads its socket from a loop of its own, so a poll of its fd
saw events one late. When the kernel dropped events (ENOBUFS), every link is listed again.
Vanished interfaces are the capture's own watch's business (TcAttacher.lost), not this.
"""

from __future__ import annotations

import errno
import fnmatch
import socket
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

GLOB = frozenset("*?[")


def is_pattern(name: str) -> bool:
    """Whether an -i value is a glob pattern rather than an interface name."""
    return not GLOB.isdisjoint(name)


class LinkFollower:
    """Interfaces of keytap's network namespace whose name matches one of the patterns."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._patterns = tuple(patterns)
        self._reported: set[int] = set()  # ifindexes already named
        self._marshal = MarshalRtnl()
        self._events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                     | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self._events.bind((0, RTMGRP_LINK))
            self._present = self._matching(_all_links())
        except BaseException:
            self._events.close()
            raise

    def present(self) -> list[str]:
        """The matching interfaces there at the start (then only new ones come from poll)."""
        return self._present

    def poll(self) -> list[tuple[str, str]]:
        """(interface, the pattern it matched) for each matching interface that appeared
        since the last call; never blocks."""
        messages = []
        while True:
            try:
                data = self._events.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                messages += _all_links()  # events were lost: look at everything
                continue
            messages += [m for m in self._marshal.parse(data) if m.get("event") == "RTM_NEWLINK"]
        found = []
        for name in self._matching(messages):
            pattern = next(p for p in self._patterns if fnmatch.fnmatchcase(name, p))
            found.append((name, f"-i {pattern!r}"))
        return found

    def _matching(self, links: Iterable) -> list[str]:
        names = []
        for link in links:
            name, index = link.get_attr("IFLA_IFNAME"), link["index"]
            if (name and index not in self._reported
                    and any(fnmatch.fnmatchcase(name, p) for p in self._patterns)):
                self._reported.add(index)
                names.append(name)
        return names

    def close(self) -> None:
        self._events.close()


def _all_links() -> list:
    with IPRoute() as ipr:
        return list(ipr.get_links())
