"""A real container runtime for the lab: Debian's containerd with its CRI plugin and a CNI
bridge network, its own instance (config, state, socket under a test directory) running in
the lab's node namespace, so its bridge and pod veths never touch the host's network.

Pods are started the way kubelet starts them: RunPodSandbox with Kubernetes metadata, labels
and annotations, on a pause image built here from a static binary (no registry is reachable),
imported as an OCI archive. Every sandbox is stopped and removed, containerd and its shims
end, and its directories go, whatever the test did.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from keytap.demo.labnet import Lab
from keytap.k8s.cri import api_pb2 as cri
from keytap.k8s.runtime import CriClient

PAUSE_IMAGE = "keytap.test/pause:1"
CNI_BIN = "/usr/lib/cni"  # Debian's containernetworking-plugins
POD_SUBNET = "10.247.0.0/24"  # inside the node namespace only, on its bridge
BRIDGE = "kt-cni0"
SHIM_SOCKETS = Path("/run/containerd/s")  # fixed in containerd 1.6, whatever its config
NEEDED = ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "gcc")
PAUSE_C = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGINT, stop); signal(SIGTERM, stop); signal(SIGCHLD, reap);
    for (;;) pause();
}
"""


def missing_tools() -> list[str]:
    found = [t for t in NEEDED if shutil.which(t) or Path(CNI_BIN, t).exists()]
    missing = [t for t in NEEDED if t not in found]
    return missing + [f"{CNI_BIN}/{p}" for p in ("bridge", "host-local", "loopback")
                      if not Path(CNI_BIN, p).exists()]


def pause_image(directory: Path) -> Path:
    """An OCI image archive with one layer: a static pause binary as /pause."""
    source, binary = directory / "pause.c", directory / "pause"
    source.write_text(PAUSE_C)
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(source)], check=True)
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tar.gettarinfo(str(binary), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        with binary.open("rb") as data:
            tar.addfile(info, data)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer_desc = blob(layer.getvalue(), "application/vnd.oci.image.layer.v1.tar")
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Entrypoint": ["/pause"]},
              "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}
    config_desc = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = blob(json.dumps(manifest).encode(), manifest["mediaType"])
    manifest_desc["annotations"] = {"io.containerd.image.name": PAUSE_IMAGE,
                                    "org.opencontainers.image.ref.name": "1"}
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    archive = directory / "pause.oci.tar"
    with tarfile.open(archive, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(f"blobs/sha256/{digest.removeprefix('sha256:')}", data)
    return archive


@dataclass
class Containerd:
    """containerd in `lab.node`; `client` speaks CRI to it."""

    lab: Lab
    directory: Path
    process: subprocess.Popen | None = None
    _made_run_dir: bool = False
    sandboxes: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # sandbox id -> `ip netns` name

    @property
    def socket(self) -> str:
        return str(self.directory / "containerd.sock")

    def start(self) -> Containerd:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._made_run_dir = not SHIM_SOCKETS.parent.exists()
        net_d = self.directory / "net.d"
        net_d.mkdir(exist_ok=True)
        (net_d / "10-keytap-lab.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "keytap-lab",
            "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True,
                         "ipMasq": False, "hairpinMode": False,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                                  "dataDir": str(self.directory / "ipam")}}]}))
        config = self.directory / "config.toml"
        config.write_text(f"""version = 2
root = "{self.directory}/root"
state = "{self.directory}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  enable_cdi = false
  restrict_oom_score_adj = true  # no CAP_SYS_RESOURCE here: keep the oom score runc may set
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{net_d}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{self.directory}/runc"
""")
        log = (self.directory / "containerd.log").open("wb")
        # Only its network namespace is the node's: its mounts (/var/run/netns/cni-*, rootfs)
        # are the host's, which keytap, in `ip netns exec`, sees too.
        self.process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.lab.node}", "containerd", "--config",
             str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        image = pause_image(self.directory)
        subprocess.run(["ctr", "--address", self.socket, "-n", "k8s.io", "images", "import",
                        str(image)], check=True, capture_output=True)
        return self

    def _wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log_tail()}")
            if Path(self.socket).exists():
                with contextlib.suppress(Exception), CriClient(self.socket) as client:
                    client.version()
                    return
            time.sleep(0.1)
        raise TimeoutError(f"containerd's CRI did not answer: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.directory / "containerd.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def run_pod(self, namespace: str, name: str, labels: dict[str, str] | None = None,
                host_network: bool = False) -> str:
        """RunPodSandbox as kubelet sends it (metadata, its io.kubernetes.* labels, a cgroup
        parent, a log directory); the sandbox's id."""
        uid = str(uuid.uuid4())
        logs = self.directory / "pods" / f"{namespace}_{name}_{uid}"
        logs.mkdir(parents=True)
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=0),
            hostname="" if host_network else name, log_directory=str(logs),  # the node's
            dns_config=cri.DNSConfig(servers=["10.247.0.10"],
                                     searches=[f"{namespace}.svc.cluster.local"]),
            labels={**(labels or {}), "io.kubernetes.pod.name": name,
                    "io.kubernetes.pod.namespace": namespace, "io.kubernetes.pod.uid": uid},
            annotations={"kubernetes.io/config.source": "api",
                         "kubernetes.io/config.seen": "2026-12-01T00:00:00Z"},
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=f"/kubepods/besteffort/pod{uid}",
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(
                        network=cri.NODE if host_network else cri.POD,
                        pid=cri.CONTAINER, ipc=cri.POD))))
        with CriClient(self.socket) as client:
            sandbox_id = client.run_sandbox(config)
        self.sandboxes.append(sandbox_id)
        return sandbox_id

    def enter(self, sandbox_id: str) -> tuple[str, str]:
        """An `ip netns` name for the pod's network namespace (so that the lab's helpers run
        processes in it, as a container of the pod would) and the pod's IP."""
        with CriClient(self.socket) as client:
            status, info = client.sandbox_status(sandbox_id)
        name = f"{self.lab.node}-{sandbox_id[:8]}"
        subprocess.run(["ip", "netns", "attach", name, str(info["pid"])], check=True)
        self.names[sandbox_id] = name
        return name, status.network.ip

    def remove_pod(self, sandbox_id: str) -> None:
        """What kubelet does when the pod is deleted: stop and remove its sandbox."""
        name = self.names.pop(sandbox_id, None)
        if name is not None:  # only the name goes; the sandbox's removal ends the namespace
            subprocess.run(["ip", "netns", "delete", name], check=False)
        with CriClient(self.socket) as client:
            client.remove_sandbox(sandbox_id)
        self.sandboxes.remove(sandbox_id)

    def stop(self) -> None:
        """Every sandbox removed, containerd and its shims ended, its directories gone."""
        if self.process is not None and self.process.poll() is None:
            for sandbox_id in list(self.sandboxes):
                with contextlib.suppress(Exception):
                    self.remove_pod(sandbox_id)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self._shims():  # ours only: they carry our socket's address
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-R", str(self.directory / "root")], capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._made_run_dir:  # the shims' socket directory, if this run made it
            for directory in (SHIM_SOCKETS, SHIM_SOCKETS.parent):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only when empty: another containerd may use it

    def _shims(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                words = (entry / "cmdline").read_bytes().split(b"\0")
                if words[0].endswith(b"containerd-shim-runc-v2") and \
                        self.socket.encode() in words:
                    found.append(int(entry.name))
        return found
