"""keytap.tls.discovery against live processes: our own children and, in the lab, a netns."""

from __future__ import annotations

import io
import os
import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from keytap.kernel.peers import netns_id, peer_netns_ids
from keytap.tls.discovery import (
    LibraryCache,
    ProcessLibrary,
    _file_mappings,
    _reachable,
    libraries_of_process,
    pids_in_netns,
    process_libraries,
)
from keytap.tls.libraries import CALL_SYMBOLS, Flavor, Linkage, TlsLibrary
from keytap.tls.offsets import load_offsets
from keytap.tls.probes import TlsProbes
from keytap.tls.selfcheck import SelfCheck

SYSTEM_PYTHON = "/usr/bin/python3"
SYSTEM_LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
SYSTEM_OPENSSL = ssl.OPENSSL_VERSION.split()[1]  # what the system libssl says when it runs


class Child:
    """A process that loads something, says "ready" and sleeps until killed."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"{argv} did not start: {line!r}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def python_child(code: str, python: str = SYSTEM_PYTHON) -> Child:
    return Child([python, "-c", f"{code}\nimport time; print('ready', flush=True); time.sleep(60)"])


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


def by_display_path(libraries: list[TlsLibrary], suffix: str) -> TlsLibrary:
    matches = [lib for lib in libraries if lib.display_path.endswith(suffix)]
    assert len(matches) == 1, [lib.display_path for lib in libraries]
    return matches[0]


# --- namespaces and processes ----------------------------------------------------------------


def test_netns_id_is_the_namespace_inode() -> None:
    assert netns_id(os.getpid()) == os.stat("/proc/self/ns/net").st_ino


def test_pids_in_netns() -> None:
    own = netns_id(os.getpid())
    everyone = pids_in_netns(None)
    mine = pids_in_netns({own})
    assert os.getpid() in mine
    assert set(mine) <= set(everyone)
    assert pids_in_netns([]) == []
    assert pids_in_netns({0}) == []  # no namespace has inode 0


def test_non_pair_interface_is_in_our_namespace() -> None:
    assert peer_netns_ids("lo") == {netns_id(os.getpid())}


def test_unknown_interface() -> None:
    with pytest.raises(LookupError):
        peer_netns_ids("kt-nonexistent")


# --- libraries of live processes -------------------------------------------------------------


def test_python_with_ssl_uses_system_libssl(children: list[Child]) -> None:
    child = python_child("import ssl")
    children.append(child)

    libraries = libraries_of_process(child.pid, LibraryCache())

    lib = by_display_path(libraries, "/libssl.so.3")
    assert (lib.flavor, lib.version, lib.linkage) == (
        Flavor.OPENSSL,
        SYSTEM_OPENSSL,
        Linkage.DYNAMIC,
    )
    assert str(lib.path) == f"/proc/{child.pid}/root{lib.display_path}"
    assert lib.crypto_display_path is not None
    assert lib.crypto_display_path.endswith("/libcrypto.so.3")
    assert str(lib.crypto_path) == f"/proc/{child.pid}/root{lib.crypto_display_path}"
    assert set(lib.uprobe_targets()) == {
        "SSL_do_handshake", *CALL_SYMBOLS, "SSL_get_version", "EVP_PKEY_derive"}
    assert lib.uprobe_targets()["EVP_PKEY_derive"].path == lib.crypto_path
    # libcrypto is part of the libssl entry, not a TLS library of its own
    assert [x.display_path for x in libraries] == [lib.display_path]


def test_python_without_ssl_has_no_tls_library(children: list[Child]) -> None:
    child = python_child("import json")
    children.append(child)
    assert libraries_of_process(child.pid, LibraryCache()) == []


def test_cryptography_wheel_is_found_as_static_openssl(children: list[Child]) -> None:
    from cryptography.hazmat.backends.openssl import backend

    child = python_child("import cryptography.hazmat.bindings._rust", python=sys.executable)
    children.append(child)

    libraries = libraries_of_process(child.pid, LibraryCache())

    lib = by_display_path(libraries, "/_rust.abi3.so")
    expected = backend.openssl_version_text().split()[1]  # 4.0.3 for cryptography 50.0.2
    assert (lib.flavor, lib.version, lib.linkage) == (Flavor.OPENSSL, expected, Linkage.STATIC)
    assert lib.crypto_path is None
    assert lib.missing_symbols == ()


def test_cache_parses_each_file_once_and_rebases_paths(children: list[Child]) -> None:
    first, second = python_child("import ssl"), python_child("import ssl")
    children += [first, second]
    cache = LibraryCache()

    a = by_display_path(libraries_of_process(first.pid, cache), "/libssl.so.3")
    size = len(cache)
    b = by_display_path(libraries_of_process(second.pid, cache), "/libssl.so.3")

    assert len(cache) == size  # same files: nothing new was inspected
    assert str(a.path).startswith(f"/proc/{first.pid}/root/")
    assert str(b.path).startswith(f"/proc/{second.pid}/root/")
    assert str(b.crypto_path).startswith(f"/proc/{second.pid}/root/")
    assert (a.version, dict(a.symbols), a.build_id) == (b.version, dict(b.symbols), b.build_id)


def test_process_libraries_of_our_namespace(children: list[Child]) -> None:
    child = python_child("import ssl")
    children.append(child)
    found = process_libraries({netns_id(os.getpid())}, LibraryCache())
    mine = [pl for pl in found if pl.pid == child.pid]
    assert len(mine) == 1
    assert isinstance(mine[0], ProcessLibrary)
    assert mine[0].library.display_path.endswith("/libssl.so.3")


def test_copied_library_is_found_also_once_deleted(tmp_path: Path,
                                                   children: list[Child]) -> None:
    """A private copy is paired with its own libcrypto; once deleted (an upgrade under a
    running process), both are read as they were mapped, through /proc/PID/map_files."""
    for name in ("libcrypto.so.3", "libssl.so.3"):
        shutil.copy(SYSTEM_LIBDIR / name, tmp_path / name)
    child = python_child(
        "import ctypes\n"
        f"ctypes.CDLL('{tmp_path}/libcrypto.so.3', mode=ctypes.RTLD_GLOBAL)\n"
        f"ctypes.CDLL('{tmp_path}/libssl.so.3')"
    )
    children.append(child)

    lib = by_display_path(libraries_of_process(child.pid, LibraryCache()), "/libssl.so.3")
    assert lib.display_path == f"{tmp_path}/libssl.so.3"
    assert lib.crypto_display_path == f"{tmp_path}/libcrypto.so.3"
    assert lib.version == SYSTEM_OPENSSL

    (tmp_path / "libssl.so.3").unlink()
    (tmp_path / "libcrypto.so.3").unlink()
    kept = by_display_path(libraries_of_process(child.pid, LibraryCache()),
                           "/libssl.so.3 (deleted)")
    assert str(kept.path).startswith(f"/proc/{child.pid}/map_files/")
    assert kept.crypto_display_path == f"{tmp_path}/libcrypto.so.3 (deleted)"
    assert (kept.version, kept.build_id, dict(kept.symbols)) == (
        lib.version, lib.build_id, dict(lib.symbols))


def test_a_deleted_executable_is_reached_through_map_files(tmp_path: Path,
                                                            children: list[Child]) -> None:
    """Its maps name it at a zero-padded address (a non-PIE executable: 00400000-...), which
    map_files does not pad. (A Go service upgraded under itself is found this way.)"""
    executable = tmp_path / "python"
    shutil.copy(os.path.realpath(SYSTEM_PYTHON), executable)
    child = python_child("pass", python=str(executable))
    children.append(child)
    executable.unlink()
    mapping = next(m for m in _file_mappings(child.pid) if m.display_path == str(executable))
    assert mapping.deleted
    reached = _reachable(child.pid, mapping)
    assert reached is not None and reached[1] == f"{executable} (deleted)"
    assert os.stat(reached[0]).st_ino == os.stat(f"/proc/{child.pid}/exe").st_ino


def test_gone_process_has_no_libraries() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert libraries_of_process(proc.pid, LibraryCache()) == []


# --- lab: a veth into another network namespace ----------------------------------------------


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.fixture
def veth_netns() -> Iterator[tuple[str, str]]:
    """(netns name, host-side veth) with the peer inside the namespace; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = uuid.uuid4().hex[:6]
    ns, host, peer = f"ktdisc-{tag}", f"ktdh{tag}", f"ktdp{tag}"
    subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    try:
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns)
        run("ip", "link", "set", host, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "addr", "add", f"{subnet}.2/30", "dev", peer)
        run("ip", "-n", ns, "link", "set", peer, "up")
        yield ns, host
    finally:
        subprocess.run(["ip", "link", "del", host], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.lab
def test_peer_netns_of_a_veth(veth_netns: tuple[str, str], children: list[Child]) -> None:
    ns, host = veth_netns
    code = "import ssl,time; print('ready', flush=True); time.sleep(30)"
    # `ip netns exec` execs python itself, so the child's pid is the python process
    child = Child(["ip", "netns", "exec", ns, SYSTEM_PYTHON, "-c", code])
    children.append(child)
    target = netns_id(child.pid)
    assert target != netns_id(os.getpid())

    assert peer_netns_ids(host) == {target}

    pids = pids_in_netns(peer_netns_ids(host))
    assert child.pid in pids
    assert os.getpid() not in pids

    found = process_libraries({target}, LibraryCache())
    assert [(pl.pid, pl.library.version) for pl in found] == [(child.pid, SYSTEM_OPENSSL)]


def test_a_root_that_goes_away_mid_walk_yields_nothing(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A /proc/PID/root whose process exits while the system libssl is looked for in it: the
    rescan finds nothing there (it was a traceback that ended the capture)."""
    from keytap.tls import probes

    (tmp_path / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib" / "x86_64-linux-gnu" / "libssl.so.3").touch()
    scandir = os.scandir

    def gone(path):  # the process exits after the root's first directory was listed
        if Path(path) != tmp_path:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return scandir(path)

    assert probes._glob(tmp_path, "lib/*/libssl.so.*")  # the premise: it is found
    monkeypatch.setattr(os, "scandir", gone)
    with pytest.raises(FileNotFoundError):
        sorted(tmp_path.glob("lib/*/libssl.so.*"))  # what pathlib does on its own
    assert probes._glob(tmp_path, "lib/*/libssl.so.*") == []


def test_keytaps_own_processes_are_never_in_scope() -> None:
    """keytap maps cryptography's bundled OpenSSL but never speaks TLS:
    not probed, and not held by the launch gate, even where every process is in scope."""
    own = frozenset({os.getpid()})
    probes = TlsProbes(None, load_offsets(None), source=None, selfcheck=SelfCheck(),  # type: ignore[arg-type]
                       log=io.StringIO(), own_pids=own)
    assert not probes.in_scope(os.getpid()) and probes.in_scope(os.getppid())
