"""Issue 17: pods named the Kubernetes way, found through a real container runtime's CRI.

containerd (Debian's, its own instance in the lab's node namespace, a CNI bridge network)
starts pod sandboxes exactly as kubelet asks it to; the pod's HTTPS server runs in the pod's
network namespace, its client on the node. keytap is told only the pod's NAMESPACE/NAME or a
label, never an interface, and tshark decrypts what it wrote.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from tests.support import tls_lab, tshark
from tests.support.cri_lab import Containerd, missing_tools
from tests.support.runner import keytap_command
from tests.support.tls_lab import SESSIONS, read_keylog

PORT = 8443
OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")


@pytest.fixture
def containerd(lab: Lab, tmp_path: Path) -> Iterator[Containerd]:
    missing = missing_tools()
    if missing:
        pytest.fail(f"the CRI tests need {', '.join(missing)} (Debian's containerd and "
                    "containernetworking-plugins): run tools/setup")
    runtime = Containerd(lab, tmp_path / "containerd")
    try:
        yield runtime.start()
    finally:
        runtime.stop()


def serve(lab: Lab, containerd: Containerd, sandbox_id: str, tmp_path: Path, tag: str) -> str:
    """The pod's HTTPS server (system libssl, its own key log); the pod's IP."""
    netns, ip = containerd.enter(sandbox_id)
    www = tmp_path / f"www-{tag}"
    www.mkdir()
    (www / "index.html").write_text(f"hello from {tag}\n")
    tls_lab.start_python_server(lab, netns, ip, PORT, tls_lab.make_certificate(tmp_path),
                                tmp_path / f"server-{tag}.keys", www)
    return ip


def fetch_all(lab: Lab, ip: str, tmp_path: Path, tag: str) -> None:
    """Every TLS version and suite, from the node (out of the key scope: only the pod's own
    secrets can decrypt)."""
    for index, session in enumerate(SESSIONS):
        out = tmp_path / f"out-{tag}-{index}"
        tls_lab.python_ssl_client(lab, lab.node, ip, PORT, "/index.html", session,
                                  tmp_path / f"client-{tag}.keys", out)
        assert out.read_text() == f"hello from {tag}\n"


def run_keytap(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    return lab.run(lab.node, *keytap_command(*args), check=False, timeout=120)


def test_pod_by_name_is_captured_and_decrypted(lab: Lab, containerd: Containerd, keytap,
                                               tmp_path: Path) -> None:
    web = containerd.run_pod("shop", "web-0", {"app": "web"})
    containerd.run_pod("shop", "cart-0", {"app": "cart"})  # a neighbour: not captured
    ip = serve(lab, containerd, web, tmp_path, "web")
    capture, keys = tmp_path / "web.pcapng", tmp_path / "keytap.keys"
    process = keytap("capture", "--pod", "shop/web-0", "--cri-socket", containerd.socket,
                     "-o", str(capture), "--keylog-file", str(keys)).start()
    assert "keytap: pod shop/web-0: veth" in process.stderr
    fetch_all(lab, ip, tmp_path, "web")
    assert process.stop() == 0, process.stderr
    assert read_keylog(keys) == read_keylog(tmp_path / "server-web.keys")
    bodies = tshark.export_http_objects(capture, tmp_path / "objects", OUT_OF_ORDER)
    assert [b.read_text() for b in bodies] == ["hello from web\n"] * len(SESSIONS)


def test_pod_errors_are_one_line_and_exit_2(lab: Lab, containerd: Containerd,
                                            tmp_path: Path) -> None:
    containerd.run_pod("shop", "web-0")
    containerd.run_pod("shop", "web-1")
    containerd.run_pod("kube-system", "kube-proxy-x", host_network=True)
    output = tmp_path / "x.pcapng"
    cases = {
        ("--pod", "shop/web-9"): ("no pod shop/web-9 on this node (nearest here: ",
                                  "shop/web-0", "shop/web-1"),
        ("--pod", "kube-system/kube-proxy-x"): ("uses the node's network (hostNetwork: true)",),
        ("--pod", "web-0"): ("give NAMESPACE/NAME",),
    }
    for args, expected in cases.items():
        result = run_keytap(lab, "capture", *args, "--cri-socket", containerd.socket,
                            "-o", str(output))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("keytap: "), result.stderr
        assert all(text in lines[0] for text in expected), lines[0]
    result = run_keytap(lab, "capture", "--pod", "shop/web-0", "--cri-socket",
                        str(tmp_path / "none.sock"), "-o", str(output))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"keytap: --cri-socket {tmp_path / 'none.sock'}: no "
                                     "container runtime socket there")
    assert not output.exists()


def test_selector_follows_pods_that_start_and_end_during_the_capture(
        lab: Lab, containerd: Containerd, keytap, tmp_path: Path) -> None:
    first = containerd.run_pod("shop", "web-0", {"app": "web", "tier": "front"})
    containerd.run_pod("shop", "cart-0", {"app": "cart"})  # another label: not captured
    containerd.run_pod("shop", "web-host", {"app": "web"}, host_network=True)
    capture, keys = tmp_path / "web.pcapng", tmp_path / "keytap.keys"
    process = keytap("capture", "--selector", "app=web", "--cri-socket", containerd.socket,
                     "-o", str(capture), "--keylog-file", str(keys)).start()
    assert "keytap: pod shop/web-0: veth" in process.stderr
    assert "shop/web-host uses the node's network" in process.stderr  # said, left out
    assert "cart" not in process.stderr
    fetch_all(lab, serve(lab, containerd, first, tmp_path, "web-0"), tmp_path, "web-0")

    later = containerd.run_pod("shop", "web-1", {"app": "web"})  # after the capture started
    process.wait_for("pod shop/web-1: capturing veth", timeout_s=5)
    fetch_all(lab, serve(lab, containerd, later, tmp_path, "web-1"), tmp_path, "web-1")

    containerd.remove_pod(first)  # kubectl delete pod: its veth goes, the capture goes on
    process.wait_for("the interface was deleted", timeout_s=5)
    assert process.stop() == 0, process.stderr
    assert read_keylog(keys) == (read_keylog(tmp_path / "server-web-0.keys")
                                 | read_keylog(tmp_path / "server-web-1.keys"))
    bodies = tshark.export_http_objects(capture, tmp_path / "objects", OUT_OF_ORDER)
    assert sorted(b.read_text() for b in bodies) == (
        ["hello from web-0\n"] * len(SESSIONS) + ["hello from web-1\n"] * len(SESSIONS))


def test_per_node_files_merged_with_mergecap_still_decrypt(
        lab: Lab, containerd: Containerd, keytap, tmp_path: Path) -> None:
    """What a DaemonSet leaves is one file per node; mergecap keeps every file's DSBs."""
    files = []
    for name in ("web-0", "web-1"):
        sandbox_id = containerd.run_pod("shop", name, {"app": "web"})
        ip = serve(lab, containerd, sandbox_id, tmp_path, name)
        files.append(tmp_path / f"{name}.pcapng")
        process = keytap("capture", "--pod", f"shop/{name}", "--cri-socket", containerd.socket,
                         "-o", str(files[-1])).start()
        fetch_all(lab, ip, tmp_path, name)
        assert process.stop() == 0, process.stderr
    merged = tmp_path / "merged.pcapng"
    subprocess.run(["mergecap", "-w", str(merged), *map(str, files)], check=True)
    bodies = tshark.export_http_objects(merged, tmp_path / "objects", OUT_OF_ORDER)
    assert sorted(b.read_text() for b in bodies) == (
        ["hello from web-0\n"] * len(SESSIONS) + ["hello from web-1\n"] * len(SESSIONS))
