"""Where to capture a pod: its sandbox's network namespace and that namespace's host-side
interfaces, resolved through CRI. Hands the capture interface names and a key scope; nothing
here attaches or captures.

A pod's network namespace is found, in order, at the path in the sandbox's runtime spec (here,
then through /proc/1/root: the node's file system when keytap runs in a container with
hostPID), then through the sandbox's own process, then through its containers' processes.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from keytap.errors import BadInput, KeytapError
from keytap.k8s.cri import api_pb2 as cri
from keytap.k8s.runtime import NOT_FOUND, CriClient, CriError, find_socket
from keytap.kernel.peers import host_peers

NEAREST = 3  # node-local pods named when the one asked for is not there


@dataclass(frozen=True)
class Pod:
    """A pod on this node, as a capture needs it."""

    namespace: str
    name: str
    sandbox_id: str
    netns: int  # inode of its network namespace: the key scope
    interfaces: tuple[str, ...]  # host-side ends of its network: what to capture

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodUnusable(BadInput):
    """The pod is there but cannot be captured from its network (host network, no veth)."""


def parse_pod_ref(text: str) -> tuple[str, str]:
    """NAMESPACE/NAME, as kubectl would print it."""
    namespace, slash, name = text.partition("/")
    if not (slash and namespace and name) or "/" in name:
        raise BadInput(f"--pod {text!r}: give NAMESPACE/NAME (e.g. default/web-0)")
    return namespace, name


def parse_selector(texts: Iterable[str]) -> dict[str, str]:
    """LABEL=VALUE terms (repeated or comma-separated, all must hold: kubectl's -l, equality
    only, which is what CRI filters by)."""
    labels: dict[str, str] = {}
    for text in texts:
        for term in text.split(","):
            key, equals, value = term.partition("=")
            key, value = key.strip(), value.strip().removeprefix("=")  # k==v as kubectl
            if not (equals and key) or "!" in key:
                raise BadInput(f"--selector {text!r}: give LABEL=VALUE[,LABEL=VALUE...]")
            labels[key] = value
    return labels


def resolve_pods(refs: Iterable[str], cri_socket: str | None, exclude: Iterable[str] = (),
                 log: TextIO = sys.stderr) -> tuple[str, ...]:
    """--pod: the host-side interfaces of these pods, less those in `exclude` (given with -i),
    each said once on `log`. Raises BadInput (exit 2) before anything is attached."""
    names: list[str] = []
    with CriClient(find_socket(cri_socket)) as client:
        resolver = PodResolver(client)
        for ref in refs:
            pod = resolver.pod(ref)
            log.write(f"keytap: pod {pod.ref}: {', '.join(pod.interfaces)}\n")
            names += [n for n in pod.interfaces if n not in names and n not in exclude]
    return tuple(names)


def follow_pods(selectors: Iterable[str], cri_socket: str | None, exclude: Iterable[str] = (),
                log: TextIO = sys.stderr) -> tuple[PodFollower, tuple[str, ...]]:
    """--selector: a follower for the capture, and the interfaces of the matching pods that
    run already, less those in `exclude`. Raises BadInput (exit 2) before anything is
    attached."""
    labels = parse_selector(selectors)
    follower = PodFollower(PodResolver(CriClient(find_socket(cri_socket))), labels, log)
    try:
        found = follower.new_interfaces()
    except BaseException:
        follower.close()
        raise
    for name, pod in found:
        log.write(f"keytap: {pod}: {name}\n")
    return follower, tuple(dict.fromkeys(name for name, _pod in found if name not in exclude))


class PodFollower:
    """The pods of this node whose labels match, those that start during the capture
    included: the capture polls it (session.InterfaceFollower) about twice a second."""

    def __init__(self, resolver: PodResolver, labels: Mapping[str, str],
                 log: TextIO = sys.stderr) -> None:
        self._resolver = resolver
        self._labels = dict(labels)
        self._log = log
        self._done: set[str] = set()  # sandboxes captured, or left out and said why
        self._failing = False

    def poll(self) -> list[tuple[str, str]]:
        """Interfaces of pods that matched since the last call; a runtime that stops
        answering is said once and asked again at the next call."""
        try:
            found = self.new_interfaces()
        except KeytapError as error:
            if not self._failing:
                self._log.write(f"keytap: --selector: {error}; asking again\n")
            self._failing = True
            return []
        self._failing = False
        return found

    def new_interfaces(self) -> list[tuple[str, str]]:
        """(interface, "pod NAMESPACE/NAME") of each matching pod not seen yet. Raises
        KeytapError when the runtime cannot be asked."""
        found = []
        for sandbox in self._resolver.client.sandboxes(self._labels):
            if sandbox.id in self._done:
                continue
            try:
                pod = self._resolver.describe(sandbox)
            except PodUnusable as error:
                self._log.write(f"keytap: --selector: {error}; left out\n")
            except CriError as error:
                if error.code not in NOT_FOUND:  # NOT_FOUND: deleted as it was listed
                    raise
                continue
            else:
                found += [(name, f"pod {pod.ref}") for name in pod.interfaces]
            self._done.add(sandbox.id)
        return found

    def close(self) -> None:
        self._resolver.client.close()


class PodResolver:
    """Finds pods through one CRI client; `peers` maps a netns path to its host-side
    interfaces (kernel.peers.host_peers; tests give their own)."""

    def __init__(self, client: CriClient,
                 peers: Callable[[str], list[str]] = host_peers) -> None:
        self.client = client
        self._peers = peers

    def pod(self, ref: str) -> Pod:
        """--pod NAMESPACE/NAME. Raises BadInput: not on this node (naming the nearest pods
        that are), host network, no host-side interface."""
        namespace, name = parse_pod_ref(ref)
        sandboxes = self.client.sandboxes()
        matches = [s for s in sandboxes
                   if (s.metadata.namespace, s.metadata.name) == (namespace, name)]
        if not matches:
            raise BadInput(f"no pod {ref} on this node ({nearest(ref, sandboxes)})")
        newest = max(matches, key=lambda s: s.created_at)  # a restarted pod: its live sandbox
        return self.describe(newest)

    def describe(self, sandbox: cri.PodSandbox) -> Pod:
        ref = f"{sandbox.metadata.namespace}/{sandbox.metadata.name}"
        status, info = self.client.sandbox_status(sandbox.id)
        if status.linux.namespaces.options.network == cri.NODE:
            raise PodUnusable(f"pod {ref} uses the node's network (hostNetwork: true): its "
                              "traffic is the node's own; capture the node's interfaces "
                              "with -i instead")
        handle = self._netns_handle(sandbox.id, info)
        if handle is None:
            raise PodUnusable(f"pod {ref}: cannot open its network namespace (run keytap "
                              "in the node's PID namespace: hostPID)")
        interfaces = tuple(self._peers(handle))
        if not interfaces:
            raise PodUnusable(f"pod {ref}: no veth or netkit in keytap's network namespace "
                              "leads into the pod's (run keytap with hostNetwork)")
        return Pod(sandbox.metadata.namespace, sandbox.metadata.name, sandbox.id,
                   os.stat(handle).st_ino, interfaces)

    def _netns_handle(self, sandbox_id: str, info: Mapping[str, Any]) -> str | None:
        """A path that opens the sandbox's network namespace, or None."""
        candidates = []
        path = _spec_netns_path(info)
        if path:
            candidates += [path, f"/proc/1/root{path}"]
        pid = info.get("pid")
        if isinstance(pid, int) and pid > 0:
            candidates.append(f"/proc/{pid}/ns/net")
        for candidate in candidates:
            if _is_netns(candidate):
                return candidate
        for pid in self.client.container_pids(sandbox_id):
            if _is_netns(f"/proc/{pid}/ns/net"):
                return f"/proc/{pid}/ns/net"
        return None


def nearest(ref: str, sandboxes: Iterable[cri.PodSandbox]) -> str:
    """What to say instead: the node-local pods whose NAMESPACE/NAME is closest to `ref`."""
    refs = sorted({f"{s.metadata.namespace}/{s.metadata.name}" for s in sandboxes})
    if not refs:
        return "no pod runs on this node"
    close = difflib.get_close_matches(ref, refs, n=NEAREST, cutoff=0.0)
    return "nearest here: " + ", ".join(close)


def _spec_netns_path(info: Mapping[str, Any]) -> str | None:
    """The network namespace path in the OCI runtime spec that containerd and CRI-O report."""
    spec = info.get("runtimeSpec")
    namespaces = spec.get("linux", {}).get("namespaces", []) if isinstance(spec, dict) else []
    for namespace in namespaces:
        if isinstance(namespace, dict) and namespace.get("type") == "network":
            path = namespace.get("path")
            return path if isinstance(path, str) and path else None
    return None


def _is_netns(path: str) -> bool:
    """Whether `path` is a network namespace (nsfs), not a leftover file or a plain dir."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False
