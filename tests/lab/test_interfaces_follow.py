"""Interfaces that come and go, and pods named by a process or a namespace (issue 15).

`-i 'kt*'` while three lab pods are created and deleted one after another: each pod's veth is
attached within a second of appearing, gets its IDB, its namespace joins the key scope, and
its vanishing is said; every session of every pod is in the file and decrypts. `--pid` and
`--netns` capture the pod's host-side veth with the keys of its namespace; the ways they can
be wrong are one line and exit 2.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from keytap.demo.labnet import PREFIX, Lab, sh
from tests.support import tls_lab, tshark
from tests.support.capi import Session
from tests.support.pcapng_blocks import dsb_lines
from tests.support.runner import keytap_command
from tests.support.tls_lab import read_keylog

PORT = 4433
PODS = 3
SESSIONS = (Session("1.3", "TLS_AES_128_GCM_SHA256"),
            Session("1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"))
OUT_OF_ORDER = ("-o", "tcp.reassemble_out_of_order:TRUE")
ATTACH_S = 1.5  # the follower is asked twice a second; attaching takes a few ms more


class Pod:
    """One more pod behind the lab's node: its own namespace, veth kt<index> on the node."""

    def __init__(self, lab: Lab, index: int, tmp_path: Path) -> None:
        self.lab, self.index = lab, index
        self.ns = f"{PREFIX}{os.getpid()}extra{index}"
        self.veth = f"kt{index}"
        self.ip, self.gw = f"10.{240 + index}.1.2", f"10.{240 + index}.1.1"
        self.keys = tmp_path / f"pod{index}.keys"
        self.www = tmp_path / f"www{index}"
        self.www.mkdir()
        (self.www / "index.html").write_text(f"hello from pod {index}\n")
        self.server: subprocess.Popen | None = None

    def create(self) -> None:
        lab = self.lab
        sh("ip", "netns", "add", self.ns)
        lab.run(self.ns, "ip", "link", "set", "lo", "up")
        lab.run(lab.node, "ip", "link", "add", self.veth, "type", "veth", "peer", "name",
                "eth0", "netns", self.ns)
        lab.run(lab.node, "ip", "addr", "add", f"{self.gw}/24", "dev", self.veth)
        lab.run(lab.node, "ip", "link", "set", self.veth, "up")
        lab.run(self.ns, "ip", "addr", "add", f"{self.ip}/24", "dev", "eth0")
        lab.run(self.ns, "ip", "link", "set", "eth0", "up")
        lab.run(self.ns, "ip", "route", "add", "default", "via", self.gw)

    def serve(self, tmp_path: Path) -> None:
        tls_lab.start_python_server(self.lab, self.ns, self.ip, PORT,
                                    tls_lab.make_certificate(tmp_path), self.keys, self.www)
        self.server = self.lab.processes[-1]

    def fetch_all(self, tmp_path: Path) -> None:
        for n, session in enumerate(SESSIONS):
            out = tmp_path / f"got-{self.index}-{n}"
            tls_lab.python_ssl_client(self.lab, self.lab.client, self.ip, PORT, "/index.html",
                                      session, tmp_path / "client.keys", out)
            assert out.read_text() == f"hello from pod {self.index}\n"

    def delete(self) -> None:
        if self.server is not None:
            os.killpg(self.server.pid, 9)
            self.server.wait()
            self.server = None
        sh("ip", "netns", "delete", self.ns, check=False)


def pods_one_after_another(lab: Lab, process, tmp_path: Path, lifetime_s: float = 0.0
                           ) -> list[Pod]:
    """PODS pods under -i 'kt*', one after another: created, attached within ATTACH_S, their
    sessions fetched, kept `lifetime_s` longer, deleted and said so; then keytap stopped."""
    pods = [Pod(lab, index, tmp_path) for index in range(PODS)]
    try:
        for pod in pods:
            created = time.monotonic()
            pod.create()
            process.wait_for(f"-i 'kt*': capturing {pod.veth}", timeout_s=ATTACH_S)
            assert time.monotonic() - created < ATTACH_S
            pod.serve(tmp_path)
            pod.fetch_all(tmp_path)
            time.sleep(lifetime_s)
            pod.delete()
            process.wait_for(f"{pod.veth}: the interface was deleted", timeout_s=5)
    finally:
        for pod in pods:
            pod.delete()
    assert process.stop() == 0, process.stderr
    return pods


def test_pods_that_come_and_go_under_a_pattern_are_all_in_the_file(
        lab: Lab, keytap, tmp_path: Path) -> None:
    capture = tmp_path / "c.pcapng"
    process = keytap("capture", "-i", "kt*", "-o", str(capture)).start()
    assert "(none yet)" in process.stderr
    pods = pods_one_after_another(lab, process, tmp_path)
    names = {row[0] for row in tshark.fields(capture, "frame.interface_name")}
    assert names == {pod.veth for pod in pods}
    bodies = tshark.export_http_objects(capture, tmp_path / "objects", OUT_OF_ORDER)
    assert sorted(b.read_text() for b in bodies) == sorted(
        f"hello from pod {pod.index}\n" for pod in pods for _ in SESSIONS)
    lines = dsb_lines(capture)
    for pod in pods:
        assert read_keylog(pod.keys) <= lines  # keys from each pod's own namespace


def test_pid_and_netns_capture_the_pod_behind_them(lab: Lab, keytap, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello, pid\n")
    tls_lab.start_python_server(lab, lab.pod, lab.pod_ip, PORT,
                                tls_lab.make_certificate(tmp_path), tmp_path / "server.keys", www)
    server_pid = lab.processes[-1].pid  # `ip netns exec` became the server (exec)
    for option, value in (("--pid", str(server_pid)), ("--netns", lab.pod)):
        capture = tmp_path / f"c{option}.pcapng"
        process = keytap("capture", option, value, "-o", str(capture)).start()
        assert f"{lab.pod_veth} -> " in process.stderr  # the pod's host-side veth, no other
        tls_lab.python_ssl_client(lab, lab.client, lab.pod_ip, PORT, "/index.html",
                                  SESSIONS[0], tmp_path / "client.keys", tmp_path / "got")
        assert process.stop() == 0, process.stderr
        bodies = tshark.export_http_objects(capture, tmp_path / f"objects{option}", OUT_OF_ORDER)
        assert [b.read_text() for b in bodies] == ["hello, pid\n"]


def test_pid_and_netns_errors_are_one_line(lab: Lab, tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    lone = f"{PREFIX}{os.getpid()}lone"
    sh("ip", "netns", "add", lone)  # a namespace with no veth into it
    try:
        cases = {
            ("--pid", str(gone.pid)): "no such process",
            ("--pid", str(os.getpid())): "has no network namespace of its own",
            ("--netns", lone): "no veth or netkit",
            ("--netns", "no-such-namespace"): "no such network namespace",
        }
        for args, message in cases.items():
            ns = lab.node if args[1] != str(os.getpid()) else None
            command = keytap_command("capture", *args, "-o", str(tmp_path / "x.pcapng"))
            if ns is not None:
                command = lab.command(ns, *command)
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
            assert result.returncode == 2, (args, result.stderr)
            assert message in result.stderr and len(result.stderr.splitlines()) == 1, \
                (args, result.stderr)
            assert not (tmp_path / "x.pcapng").exists()
    finally:
        sh("ip", "netns", "delete", lone, check=False)


def test_rotated_files_of_pods_that_come_and_go_each_stand_on_their_own(
        lab: Lab, keytap, tmp_path: Path) -> None:
    """-G with a followed pattern (the way --selector follows pods): each file is 0600 and
    whole, every pod's keys are in the files, and every session decrypts from their merge (one
    that spans a cut needs the files on both sides of it)."""
    process = keytap("capture", "-i", "kt*", "-w", str(tmp_path / "c-%H%M%S.pcapng"),
                     "-G", "1").start()
    pods = pods_one_after_another(lab, process, tmp_path, lifetime_s=1.2)  # a file or more each
    files = sorted(tmp_path.glob("c-*.pcapng"))
    assert len(files) > PODS, files  # the premise: the pods' traffic spans several files
    lines = set()
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600
        lines |= dsb_lines(path)  # also checks that each file is whole blocks
    for pod in pods:
        assert read_keylog(pod.keys) <= lines
    merged = tmp_path / "merged.pcapng"
    subprocess.run(["mergecap", "-w", str(merged), *map(str, files)], check=True)
    bodies = tshark.export_http_objects(merged, tmp_path / "objects", OUT_OF_ORDER)
    assert sorted(b.read_text() for b in bodies) == sorted(
        f"hello from pod {pod.index}\n" for pod in pods for _ in SESSIONS), process.stderr
