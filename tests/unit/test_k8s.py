"""The CRI client and the pod resolver, over real gRPC on a unix socket, against a small
in-process RuntimeService (the lab tests use containerd itself)."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from keytap.errors import BadInput, KeytapError
from keytap.k8s.cri import api_pb2 as cri
from keytap.k8s.cri.api_pb2_grpc import (
    RuntimeServiceServicer,
    add_RuntimeServiceServicer_to_server,
)
from keytap.k8s.pods import (
    PodFollower,
    PodResolver,
    PodUnusable,
    parse_pod_ref,
    parse_selector,
)
from keytap.k8s.runtime import CriClient, find_socket

OWN_NETNS = "/proc/self/ns/net"  # a real network namespace for the resolver to open


def sandbox(sid: str, namespace: str, name: str, labels: dict[str, str] | None = None,
            created: int = 1) -> cri.PodSandbox:
    return cri.PodSandbox(id=sid, metadata=cri.PodSandboxMetadata(namespace=namespace, name=name),
                          labels=labels or {}, created_at=created)


class FakeRuntime(RuntimeServiceServicer):
    """Sandboxes by id; `host_network` ids run in the node's network; `spec_less` ids report
    no runtime spec (CRI-O-like or old), only their containers' pids."""

    def __init__(self) -> None:
        self.sandboxes: dict[str, cri.PodSandbox] = {}
        self.host_network: set[str] = set()
        self.spec_less: set[str] = set()

    def ListPodSandbox(self, request, context):
        wanted = dict(request.filter.label_selector)
        return cri.ListPodSandboxResponse(items=[
            s for s in self.sandboxes.values() if wanted.items() <= dict(s.labels).items()])

    def PodSandboxStatus(self, request, context):
        found = self.sandboxes.get(request.pod_sandbox_id)
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such sandbox")
        mode = cri.NODE if found.id in self.host_network else cri.POD
        status = cri.PodSandboxStatus(id=found.id, metadata=found.metadata)
        status.linux.namespaces.options.network = mode
        spec = {"linux": {"namespaces": [{"type": "pid"},
                                         {"type": "network", "path": OWN_NETNS}]}}
        info = {} if found.id in self.spec_less else {"info": json.dumps({"runtimeSpec": spec})}
        return cri.PodSandboxStatusResponse(status=status, info=info)

    def ListContainers(self, request, context):
        return cri.ListContainersResponse(containers=[
            cri.Container(id=f"{request.filter.pod_sandbox_id}-c", state=cri.CONTAINER_RUNNING)])

    def ContainerStatus(self, request, context):
        return cri.ContainerStatusResponse(info={"info": json.dumps({"pid": os.getpid()})})


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[tuple[FakeRuntime, str]]:
    path = str(tmp_path / "cri.sock")
    fake = FakeRuntime()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_RuntimeServiceServicer_to_server(fake, server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    yield fake, path
    server.stop(None)


def resolver(path: str) -> PodResolver:
    return PodResolver(CriClient(path), peers=lambda netns: ["veth-of-pod"])


def test_pod_found_with_its_interfaces_and_namespace(runtime) -> None:
    fake, path = runtime
    fake.sandboxes["a"] = sandbox("a", "shop", "web-0")
    fake.sandboxes["old"] = sandbox("old", "shop", "web-0", created=0)  # a restarted pod
    pod = resolver(path).pod("shop/web-0")
    assert (pod.ref, pod.sandbox_id, pod.interfaces) == ("shop/web-0", "a", ("veth-of-pod",))
    assert pod.netns == Path(OWN_NETNS).stat().st_ino


def test_netns_through_containers_when_the_runtime_reports_no_spec(runtime) -> None:
    fake, path = runtime
    fake.sandboxes["a"] = sandbox("a", "shop", "web-0")
    fake.spec_less.add("a")
    assert resolver(path).pod("shop/web-0").netns == Path(OWN_NETNS).stat().st_ino


def test_missing_pod_names_the_nearest_node_local_ones(runtime) -> None:
    fake, path = runtime
    for i, (namespace, name) in enumerate([("shop", "web-0"), ("shop", "cart-1"),
                                           ("kube-system", "coredns-x")]):
        fake.sandboxes[str(i)] = sandbox(str(i), namespace, name)
    with pytest.raises(BadInput, match=r"^no pod shop/web-1 on this node \(nearest here: "
                                       r"shop/web-0, "):
        resolver(path).pod("shop/web-1")


def test_no_pods_at_all(runtime) -> None:
    with pytest.raises(BadInput, match=r"no pod runs on this node"):
        resolver(runtime[1]).pod("shop/web-0")


def test_host_network_pod_is_refused_and_skipped_by_a_selector(runtime) -> None:
    fake, path = runtime
    fake.sandboxes["h"] = sandbox("h", "kube-system", "proxy", {"app": "x"})
    fake.sandboxes["p"] = sandbox("p", "shop", "web-0", {"app": "x"})
    fake.sandboxes["q"] = sandbox("q", "shop", "db-0", {"app": "y"})
    fake.host_network.add("h")
    with pytest.raises(PodUnusable, match=r"hostNetwork"):
        resolver(path).pod("kube-system/proxy")
    log = io.StringIO()
    follower = PodFollower(resolver(path), {"app": "x"}, log)
    assert follower.poll() == [("veth-of-pod", "pod shop/web-0")]
    assert "kube-system/proxy uses the node's network" in log.getvalue()
    assert follower.poll() == []  # each pod once
    fake.sandboxes["r"] = sandbox("r", "shop", "web-1", {"app": "x"})  # one that starts later
    assert follower.poll() == [("veth-of-pod", "pod shop/web-1")]
    assert log.getvalue().count("left out") == 1
    follower.close()


def test_follower_outlives_a_runtime_that_stops_answering(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    log = io.StringIO()
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
        follower = PodFollower(resolver(str(path)), {"app": "x"}, log)
        assert follower.poll() == [] and follower.poll() == []
    assert log.getvalue().count("cannot reach the container runtime") == 1  # said once


def test_runtime_not_answering_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # a socket file nobody listens on
        with pytest.raises(KeytapError, match=r"cannot reach the container runtime"):
            CriClient(str(path)).sandboxes()


def test_find_socket(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"^no container runtime socket at .*--cri-socket"):
        find_socket(None, [str(tmp_path / "none.sock")])
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInput, match=r"--cri-socket .*file: no container runtime socket"):
        find_socket(str(tmp_path / "file"))
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "ok.sock"))
        assert find_socket(None, [str(tmp_path / "x"), str(tmp_path / "ok.sock")]) \
            == str(tmp_path / "ok.sock")


@pytest.mark.parametrize("text", ["web-0", "/web-0", "shop/", "a/b/c"])
def test_bad_pod_ref(text: str) -> None:
    with pytest.raises(BadInput, match=r"NAMESPACE/NAME"):
        parse_pod_ref(text)


def test_selector_terms() -> None:
    assert parse_selector(["app=web,tier==front", "env="]) == {
        "app": "web", "tier": "front", "env": ""}
    for bad in ("app", "=web", "app!=web"):
        with pytest.raises(BadInput, match=r"LABEL=VALUE"):
            parse_selector([bad])
