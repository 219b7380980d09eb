"""tc: priority choice, filter names, and removal of filters left by dead keytaps (no netlink)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from keytap.kernel import tc
from keytap.kernel.tc import (
    ETH_P_ALL,
    FILTER_NAME,
    TC_H_CLSACT,
    Hook,
    TcAttacher,
    TcFilter,
    _choose_prio,
    _keytap_alive,
    list_filters,
    remove_stale_filters,
)

ETH_P_IP = 0x0800


def tcf(prio: int, kind: str = "bpf", protocol: int = ETH_P_ALL, handle: int = 1) -> TcFilter:
    return TcFilter(7, Hook.INGRESS, prio, handle, kind, None, protocol)


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        ([], 1),
        ([tcf(5), tcf(9, kind="u32")], 4),
        ([tcf(2)], 1),
        ([tcf(1), tcf(1, handle=2), tcf(3, kind="u32")], 1),  # bpf/ETH_P_ALL at 1: go first
        ([tcf(1, kind="u32"), tcf(4)], 5),
        ([tcf(1, protocol=ETH_P_IP), tcf(2)], 3),  # bpf, but only for IPv4
        ([tcf(1), tcf(1, kind="flower", handle=2), tcf(7)], 8),
    ],
)
def test_choose_prio(existing: list[TcFilter], expected: int) -> None:
    assert _choose_prio(existing) == expected


@pytest.mark.parametrize(
    ("name", "pid", "own"),
    [
        ("keytap_1234_0a1b2c3d", "1234", False),
        ("keytap_1234_0a1b2c3d_own", "1234", True),
        ("keytap_1234", None, None),  # no token: not a name keytap gives
        ("keytap_", None, None),
        ("keytap_12x_0a1b2c3d", None, None),
        ("keytap_1234_0a1b2c3d_owned", None, None),
        ("keytap_1234_0A1B2C3D", None, None),
        ("cilium_keytap_1234_0a1b2c3d", None, None),
        ("Keytap_1234_0a1b2c3d", None, None),
        ("", None, None),
    ],
)
def test_filter_name(name: str, pid: str | None, own: bool | None) -> None:
    match = FILTER_NAME.match(name)
    if pid is None:
        assert match is None
    else:
        assert match is not None
        assert (match["pid"], bool(match["own"])) == (pid, own)
        assert match["owner"] == f"keytap_{pid}_0a1b2c3d"


# A fake IPRoute holding a little tc state, answering with message-like objects --------------


class FakeMessage(dict):
    """A netlink message: fields by item, attributes by get_attr()."""

    def __init__(self, fields: dict, attrs: dict) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str):
        return self.attrs.get(name)


@dataclass
class FakeFilter:
    hook: Hook
    prio: int
    handle: int
    name: str | None
    kind: str = "bpf"
    protocol: int = ETH_P_ALL


@dataclass
class FakeIPRoute:
    """Links by ifindex -> name; per ifindex, whether a clsact exists and its filters."""

    links: dict[int, str]
    filters: dict[int, list[FakeFilter]] = field(default_factory=dict)
    clsact: set[int] = field(default_factory=set)
    calls: list[tuple] = field(default_factory=list)

    def get_links(self) -> list[FakeMessage]:
        return [FakeMessage({"index": i}, {"IFLA_IFNAME": n}) for i, n in self.links.items()]

    def link_lookup(self, ifname: str) -> list[int]:
        return [i for i, n in self.links.items() if n == ifname]

    def get_qdiscs(self, ifindex: int) -> list[FakeMessage]:
        if ifindex not in self.clsact:
            return []
        return [FakeMessage({"parent": TC_H_CLSACT, "handle": 0xFFFF0000},
                            {"TCA_KIND": "clsact"})]

    def get_filters(self, ifindex: int, parent: int) -> list[FakeMessage]:
        if ifindex not in self.clsact:
            raise NetlinkError(errno.EINVAL)  # what the kernel says: no clsact, no such parent
        messages = []
        for prio in sorted({f.prio for f in self.filters.get(ifindex, []) if f.hook == parent}):
            for f in self.filters[ifindex]:
                if f.hook != parent or f.prio != prio:
                    continue
                info = prio << 16 | socket.htons(f.protocol)
                if not any(m["info"] == info and m["handle"] == 0 for m in messages):
                    messages.append(FakeMessage({"info": info, "handle": 0},  # chain header
                                                {"TCA_KIND": f.kind}))
                options = FakeMessage({}, {"TCA_BPF_NAME": f.name} if f.name else {})
                messages.append(FakeMessage({"info": info, "handle": f.handle},
                                            {"TCA_KIND": f.kind, "TCA_OPTIONS": options}))
        return messages

    def tc(self, command: str, kind: str, ifindex: int, handle: int = 0, **kwargs) -> None:
        self.calls.append((command, kind, ifindex, handle, kwargs))
        if command == "del-filter":
            assert kind == "bpf" and kwargs["protocol"] == ETH_P_ALL
            before = self.filters[ifindex]
            self.filters[ifindex] = [
                f for f in before
                if (f.hook, f.prio, f.handle) != (kwargs["parent"], kwargs["prio"], handle)]
            assert len(self.filters[ifindex]) == len(before) - 1, "deleted a filter not there"
        elif command == "del" and kind == "clsact":
            self.clsact.remove(ifindex)
        elif command == "add" and kind == "clsact":
            assert ifindex not in self.clsact
            self.clsact.add(ifindex)
        elif command == "add-filter":
            self.filters.setdefault(ifindex, []).append(
                FakeFilter(Hook(kwargs["parent"]), kwargs["prio"], handle, kwargs["name"]))
        else:
            raise AssertionError(f"unexpected tc call {command} {kind}")

    def names(self, ifindex: int) -> list[str]:
        return sorted(f.name or "" for f in self.filters.get(ifindex, []))


def both_hooks(prio: int, name: str, handle: int = 1) -> list[FakeFilter]:
    return [FakeFilter(hook, prio, handle, name) for hook in Hook]


def alive_pids(*pids: int) -> Callable[[str], bool]:
    """Liveness by owner name, for the keytaps of these pids."""
    return lambda owner: int(owner.split("_")[1]) in pids


def test_list_filters_reads_messages() -> None:
    ipr = FakeIPRoute({3: "kp1"}, {3: [FakeFilter(Hook.EGRESS, 2, 5, "keytap_9_00000009"),
                                       FakeFilter(Hook.EGRESS, 2, 6, None, kind="u32",
                                                  protocol=ETH_P_IP)]}, {3})
    assert list_filters(ipr, 3, Hook.EGRESS) == [
        TcFilter(3, Hook.EGRESS, 2, 5, "bpf", "keytap_9_00000009", ETH_P_ALL),
        TcFilter(3, Hook.EGRESS, 2, 6, "u32", None, ETH_P_IP),
    ]
    assert list_filters(ipr, 3, Hook.INGRESS) == []


def test_removes_dead_keytaps_filters_only() -> None:
    ipr = FakeIPRoute(
        {1: "lo", 2: "kpa", 3: "kpb"},
        {2: [*both_hooks(1, "keytap_100_00000064"),
             *both_hooks(1, "keytap_200_000000c8", handle=2),
             *both_hooks(2, "cilium"), FakeFilter(Hook.INGRESS, 3, 1, None, kind="u32")],
         3: both_hooks(1, "keytap_100_00000064")},
        clsact={2, 3})

    removed = remove_stale_filters(ipr, alive_pids(200))

    assert sorted(removed) == ["kpa egress (pid 100)", "kpa ingress (pid 100)",
                               "kpb egress (pid 100)", "kpb ingress (pid 100)"]
    assert ipr.names(2) == ["", "cilium", "cilium", *["keytap_200_000000c8"] * 2]
    assert ipr.names(3) == []
    assert ipr.clsact == {2, 3}  # neither dead filter said _own
    assert not [c for c in ipr.calls if c[0] == "del"]


def test_removes_own_clsact_when_nothing_remains() -> None:
    ipr = FakeIPRoute({4: "kpc"}, {4: both_hooks(1, "keytap_300_0000012c_own")}, clsact={4})

    assert len(remove_stale_filters(ipr, alive_pids())) == 2

    assert ipr.clsact == set()
    assert ("del", "clsact", 4, 0, {}) in ipr.calls


def test_keeps_own_clsact_while_other_filters_remain() -> None:
    ipr = FakeIPRoute({4: "kpc"}, {4: [*both_hooks(1, "keytap_300_0000012c_own"),
                                       FakeFilter(Hook.EGRESS, 2, 1, "calico")]}, clsact={4})

    assert len(remove_stale_filters(ipr, alive_pids())) == 2

    assert ipr.names(4) == ["calico"]
    assert ipr.clsact == {4}


def test_keeps_clsact_of_a_dead_keytap_that_did_not_create_it() -> None:
    ipr = FakeIPRoute({4: "kpc"}, {4: both_hooks(1, "keytap_300_0000012c")}, clsact={4})

    assert len(remove_stale_filters(ipr, alive_pids())) == 2

    assert ipr.names(4) == []
    assert ipr.clsact == {4}


def test_live_keytap_is_left_alone() -> None:
    ipr = FakeIPRoute({4: "kpc"}, {4: both_hooks(1, "keytap_300_0000012c_own")}, clsact={4})
    asked: list[str] = []

    def alive(owner: str) -> bool:
        asked.append(owner)
        return True

    assert remove_stale_filters(ipr, alive) == []
    assert set(asked) == {"keytap_300_0000012c"}
    assert ipr.names(4) == ["keytap_300_0000012c_own", "keytap_300_0000012c_own"]
    assert ipr.calls == []


def test_interfaces_without_clsact_are_skipped() -> None:
    ipr = FakeIPRoute({1: "lo", 2: "eth0"})
    assert remove_stale_filters(ipr, alive_pids()) == []
    assert ipr.calls == []


# attaching -----------------------------------------------------------------------------------


@pytest.fixture
def no_tcx(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without tcx: BPF_LINK_CREATE does not know the attach type."""
    def refuse(prog_fd: int, ifindex: int, hook: Hook) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(tc, "tcx_link", refuse)


def test_liveness_follows_the_attacher_not_a_pid() -> None:
    attacher = TcAttacher(FakeIPRoute({}))
    assert FILTER_NAME.match(attacher.owner)
    assert _keytap_alive(attacher.owner)
    attacher.close()
    assert not _keytap_alive(attacher.owner)


def test_tcx_first_then_nothing_left_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[tuple[int, int, Hook]] = []
    closed: list[int] = []

    def link(prog_fd: int, ifindex: int, hook: Hook) -> int:
        created.append((prog_fd, ifindex, hook))
        return 100 + len(created)

    monkeypatch.setattr(tc, "tcx_link", link)
    monkeypatch.setattr(tc.os, "close", closed.append)
    ipr = FakeIPRoute({5: "kp1"})
    attacher = TcAttacher(ipr)
    attachment = attacher.attach("kp1", {Hook.INGRESS: 7, Hook.EGRESS: 8})
    assert created == [(7, 5, Hook.INGRESS), (8, 5, Hook.EGRESS)]
    assert attachment.links == [101, 102] and attacher.use_tcx
    attacher.detach_all()
    assert closed == [101, 102] and ipr.calls == []  # no qdisc, no filter touched


def test_without_tcx_clsact_is_the_fallback(no_tcx: None) -> None:
    ipr = FakeIPRoute({5: "kp1"})
    attacher = TcAttacher(ipr)
    attachment = attacher.attach("kp1", {Hook.INGRESS: 7, Hook.EGRESS: 8})
    assert not attacher.use_tcx and attachment.created_clsact
    assert ipr.names(5) == [f"{attacher.owner}_own"] * 2
    attacher.close()
    assert ipr.clsact == set()


def test_a_tcx_error_other_than_no_tcx_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(prog_fd: int, ifindex: int, hook: Hook) -> int:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(tc, "tcx_link", refuse)
    with pytest.raises(PermissionError):
        TcAttacher(FakeIPRoute({5: "kp1"})).attach("kp1", {Hook.INGRESS: 7})


def test_overlapping_keytaps_leave_no_empty_clsact(no_tcx: None) -> None:
    """Defect 8: A creates the clsact, B joins, A stops, B stops: the clsact goes with B."""
    ipr = FakeIPRoute({5: "kp1"})
    first, second = TcAttacher(ipr), TcAttacher(ipr)
    first.attach("kp1", {Hook.INGRESS: 7, Hook.EGRESS: 8})
    assert second.attach("kp1", {Hook.INGRESS: 9, Hook.EGRESS: 10}).created_clsact
    first.close()
    assert ipr.clsact == {5} and ipr.names(5) == [f"{second.owner}_own"] * 2
    second.close()
    assert ipr.clsact == set()


def test_a_foreign_clsact_is_never_inherited(no_tcx: None) -> None:
    ipr = FakeIPRoute({5: "kp1"}, {5: both_hooks(3, "cilium")}, clsact={5})
    attacher = TcAttacher(ipr)
    assert not attacher.attach("kp1", {Hook.INGRESS: 7}).created_clsact
    attacher.close()
    assert ipr.clsact == {5} and ipr.names(5) == ["cilium", "cilium"]


def test_filters_that_run_first_are_reported(no_tcx: None) -> None:
    """Defect 3 on clsact: a terminal filter at prio 1 (u32 ... flowid) runs before keytap."""
    terminal = FakeFilter(Hook.INGRESS, 1, 1, None, kind="u32", protocol=ETH_P_IP)
    ipr = FakeIPRoute({5: "kp1"}, {5: [terminal]}, clsact={5})
    attachment = TcAttacher(ipr).attach("kp1", {Hook.INGRESS: 7, Hook.EGRESS: 8})
    assert [(f.kind, f.prio, f.hook) for f in attachment.behind] == [("u32", 1, Hook.INGRESS)]
    ahead = FakeIPRoute({5: "kp1"}, {5: both_hooks(4, "cilium")}, clsact={5})
    assert TcAttacher(ahead).attach("kp1", {Hook.INGRESS: 7}).behind == []  # keytap at prio 3


def test_detach_survives_a_vanished_device(no_tcx: None) -> None:
    ipr = FakeIPRoute({5: "kp1"})
    attacher = TcAttacher(ipr)
    attacher.attach("kp1", {Hook.INGRESS: 7})

    def gone(*_args: object, **_kwargs: object) -> None:
        raise NetlinkError(errno.ENODEV)

    ipr.tc = gone  # type: ignore[method-assign]
    attacher.close()
    assert attacher.attachments == []
