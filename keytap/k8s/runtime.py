"""A small CRI client: the node's container runtime (containerd, CRI-O) over its gRPC socket.

CRI is what kubelet itself speaks, so it names pods the way Kubernetes does (namespace, name,
labels) and knows each sandbox's network namespace, on every runtime, with no API server and
no credentials: the runtime's unix socket is the whole interface.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from keytap.errors import BadInput, KeytapError
from keytap.k8s.cri import api_pb2 as cri
from keytap.k8s.cri.api_pb2_grpc import RuntimeServiceStub

# Where runtimes put their CRI socket, in the order kubelet's users most often have them.
DEFAULT_SOCKETS = (
    "/run/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/run/k3s/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
    "/var/run/crio/crio.sock",
    "/run/cri-dockerd.sock",
    # the node's /run mounted into keytap's own pod (deploy/daemonset.yaml)
    "/host/run/containerd/containerd.sock",
    "/host/run/crio/crio.sock",
    "/host/run/k3s/containerd/containerd.sock",
)
TIMEOUT_S = 10.0
NOT_FOUND = (grpc.StatusCode.NOT_FOUND,)


def find_socket(given: str | None, candidates: Sequence[str] = DEFAULT_SOCKETS) -> str:
    """The CRI socket: --cri-socket if given (it must be a socket), else the first usual path
    that holds one. Raises BadInput naming what was tried."""
    paths = [given] if given else list(candidates)
    for path in paths:
        try:
            if stat.S_ISSOCK(Path(path).stat().st_mode):
                return path
        except OSError:
            continue
    if given:
        raise BadInput(f"--cri-socket {given}: no container runtime socket there")
    raise BadInput(f"no container runtime socket at {', '.join(paths)}: is this a Kubernetes "
                   "node? give the runtime's CRI socket with --cri-socket PATH")


class CriClient:
    """RuntimeService calls with keytap's errors; one channel, closed with the client."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._stub = RuntimeServiceStub(self._channel)

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAVAILABLE:
                raise KeytapError(f"cannot reach the container runtime at {self.socket_path} "
                                  f"({details}): is it running?") from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise KeytapError(f"the runtime at {self.socket_path} does not speak CRI "
                                  f"runtime.v1 ({details})") from None
            raise CriError(code, f"container runtime: {method}: {details}") from None

    def version(self) -> cri.VersionResponse:
        return self._call("Version", cri.VersionRequest())

    def sandboxes(self, labels: Mapping[str, str] | None = None,
                  ready_only: bool = True) -> list[cri.PodSandbox]:
        """Pod sandboxes on this node, those whose labels include `labels` if given."""
        query = cri.PodSandboxFilter(label_selector=dict(labels or {}))
        if ready_only:
            query.state.state = cri.SANDBOX_READY
        return list(self._call("ListPodSandbox", cri.ListPodSandboxRequest(filter=query)).items)

    def sandbox_status(self, sandbox_id: str) -> tuple[cri.PodSandboxStatus, dict[str, Any]]:
        """The sandbox's status and the runtime's verbose info (parsed JSON, {} if none)."""
        reply = self._call("PodSandboxStatus",
                           cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True))
        return reply.status, _verbose_info(reply.info)

    def container_pids(self, sandbox_id: str) -> list[int]:
        """The main process of each running container of the sandbox, as the runtime says."""
        query = cri.ContainerFilter(pod_sandbox_id=sandbox_id)
        query.state.state = cri.CONTAINER_RUNNING
        containers = self._call("ListContainers", cri.ListContainersRequest(filter=query))
        pids = []
        for container in containers.containers:
            try:
                reply = self._call("ContainerStatus", cri.ContainerStatusRequest(
                    container_id=container.id, verbose=True))
            except CriError as error:
                if error.code in NOT_FOUND:  # it went meanwhile
                    continue
                raise
            pid = _verbose_info(reply.info).get("pid")
            if isinstance(pid, int) and pid > 0:
                pids.append(pid)
        return pids

    # For keytap's own tests, which start sandboxes exactly as kubelet does.
    def run_sandbox(self, config: cri.PodSandboxConfig) -> str:
        return self._call("RunPodSandbox", cri.RunPodSandboxRequest(config=config)).pod_sandbox_id

    def remove_sandbox(self, sandbox_id: str) -> None:
        """Stop, then remove (kubelet's order); both are idempotent in CRI."""
        self._call("StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
        self._call("RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


class CriError(KeytapError):
    """A CRI call the runtime answered with an error."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _verbose_info(info: Mapping[str, str]) -> dict[str, Any]:
    """containerd and CRI-O put their verbose details as JSON under the "info" key."""
    try:
        parsed = json.loads(info.get("info", "{}"))
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
