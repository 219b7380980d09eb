"""A throwaway network: client ns <-veth-> node ns (router, where keytap runs) <-veth-> pod ns.

Used by `keytap demo` and by the lab tests. Nothing is created in the host's network namespace:
the node namespace plays the Kubernetes node, its `kp*` veth is the pod's host-side interface
that keytap captures. Addresses are in 10.231.0.0/16 and up, used only inside these namespaces.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from keytap.errors import KeytapError

PREFIX = "ktlab"


def sh(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; a failure shows its stderr (CalledProcessError's message hides it)."""
    kwargs.setdefault("timeout", 300)  # a hung command fails its test instead of the whole run
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise KeytapError(f"{' '.join(args)} exited with {result.returncode}: "
                          f"{result.stderr.strip()}")
    return result


def remove_stale_labs() -> None:
    """Namespaces of lab runs whose test process died without cleaning up."""
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0]
        match = re.fullmatch(rf"{PREFIX}(\d+)[a-z]+\d*", name)
        if match and not Path(f"/proc/{match[1]}").exists():
            sh("ip", "netns", "delete", name, check=False)


@dataclass
class Lab:
    index: int = 0
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        tag = f"{PREFIX}{os.getpid()}"
        self.node, self.pod, self.client = (f"{tag}node{self.index}", f"{tag}pod{self.index}",
                                            f"{tag}cli{self.index}")
        self.pod_veth = f"kp{os.getpid() % 100000}x{self.index}"  # node side, what keytap captures
        self.client_veth = f"kc{os.getpid() % 100000}x{self.index}"
        net = 231 + self.index  # only meaningful inside the lab namespaces
        self.pod_ip, self.pod_gw = f"10.{net}.1.2", f"10.{net}.1.1"
        self.client_ip, self.client_gw = f"10.{net}.2.2", f"10.{net}.2.1"

    def create(self) -> Lab:
        for ns in (self.node, self.pod, self.client):
            sh("ip", "netns", "add", ns)
            self.run(ns, "ip", "link", "set", "lo", "up")
        for veth, ns, ip, gw in ((self.pod_veth, self.pod, self.pod_ip, self.pod_gw),
                                 (self.client_veth, self.client, self.client_ip, self.client_gw)):
            self.run(self.node, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                     "netns", ns)
            self.run(self.node, "ip", "addr", "add", f"{gw}/24", "dev", veth)
            self.run(self.node, "ip", "link", "set", veth, "up")
            self.run(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            self.run(ns, "ip", "link", "set", "eth0", "up")
            self.run(ns, "ip", "route", "add", "default", "via", gw)
        self.run(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return self

    def destroy(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                process.wait(timeout=5)
        for ns in (self.node, self.pod, self.client):
            sh("ip", "netns", "delete", ns, check=False)

    def command(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *args]

    def run(self, ns: str, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return sh(*self.command(ns, *args), check=check, **kwargs)

    def spawn(self, ns: str, *args: str, **kwargs) -> subprocess.Popen:
        """A background process in `ns`, in its own process group, killed by destroy()."""
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.PIPE)
        process = subprocess.Popen(self.command(ns, *args), start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def mac(self, ns: str, ifname: str) -> str:
        return self.run(ns, "cat", f"/sys/class/net/{ifname}/address").stdout.strip()

    def wait_for_port(self, ns: str, port: int, ip: str = "", timeout_s: float = 10) -> None:
        """Until something listens on [ip]:port in `ns`: no fixed sleeps."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if f"{ip}:{port} " in self.run(ns, "ss", "-Hltn").stdout:
                return
            time.sleep(0.05)
        raise TimeoutError(f"nothing listens on {ip}:{port} in {ns}")
