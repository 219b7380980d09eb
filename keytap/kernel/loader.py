"""Compile keytap's BPF programs with BCC, with one clear line for each thing that can be missing.

BCC's Python module ships with Debian's python3-bpfcc into /usr/lib/python3/dist-packages, which
a venv sees only when made with --system-site-packages; keytap also looks there itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from keytap.errors import KeytapError
from keytap.kernel.headers import KernelHeadersMissing, configure_bcc_headers
from keytap.resources import data_dir

BPF_SOURCE_DIR = data_dir("bpf")
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
NOFILE_AT_START = resource.getrlimit(resource.RLIMIT_NOFILE)  # what `-- CMD` gets back


def check_privileges() -> None:
    """Fail early, before anything is attached or created, without the needed capabilities."""
    try:
        status = Path("/proc/self/status").read_text()
        effective = int(next(line for line in status.splitlines() if line.startswith("CapEff:"))
                        .split()[1], 16)
    except (OSError, StopIteration, ValueError):
        effective = (1 << 64) - 1 if os.geteuid() == 0 else 0
    def has(cap: int) -> bool:
        return bool(effective >> cap & 1)

    if not has(CAP_NET_ADMIN) or not (has(CAP_BPF) or has(CAP_SYS_ADMIN)):
        raise KeytapError(
            "keytap needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON): run it with sudo")


def import_bcc() -> ModuleType:
    """The `bcc` module from Debian's python3-bpfcc."""
    try:
        return importlib.import_module("bcc")
    except ImportError:
        if DEBIAN_DIST_PACKAGES not in sys.path and Path(DEBIAN_DIST_PACKAGES, "bcc").is_dir():
            sys.path.append(DEBIAN_DIST_PACKAGES)
            with contextlib.suppress(ImportError):
                return importlib.import_module("bcc")
    raise KeytapError("BCC is not installed: apt-get install python3-bpfcc "
                      "(the PyPI package named 'bcc' is unrelated)")


def ensure_tracefs() -> None:
    """BCC's uprobe bookkeeping needs tracefs, which `ip netns exec` and some containers hide
    (they remount /sys). Mounting it is local to keytap's mount namespace in those cases."""
    for directory in TRACEFS_DIRS:
        if Path(directory, "uprobe_events").exists():
            return
    result = subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS_DIRS[0]],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise KeytapError(f"tracefs is not mounted and mounting it failed "
                          f"({result.stderr.strip()}): mount -t tracefs tracefs {TRACEFS_DIRS[0]}")


def allow_many_probes() -> None:
    """Each uprobe link is an open fd (three a libssl, seven before Linux 6.6: keytap.kernel.
    uprobes), and a node has a probed file per distinct TLS library (every wheel's bundled
    libssl, every copy in a temporary directory): the fd limit goes to its hard limit."""
    with contextlib.suppress(ValueError, OSError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def restore_fd_limit() -> None:
    """In the child of `-- CMD`, before its exec: the fd limit keytap was started with, not the
    one allow_many_probes raised (a workload's limits are not keytap's to change)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, NOFILE_AT_START)


def compile_program(source_name: str, defines: dict[str, int],
                    generated: Mapping[str, str] | None = None) -> object:
    """Compile bpf/<source_name> with -D defines; returns the bcc.BPF object. `generated`
    maps header names to C text made at run time (a filter expression), for #include."""
    try:
        configure_bcc_headers()
    except KernelHeadersMissing as missing:
        raise KeytapError(str(missing)) from None
    bcc = import_bcc()
    source = BPF_SOURCE_DIR / source_name
    if not source.is_file():
        raise KeytapError(f"BPF source {source} is missing: reinstall keytap from its repository")
    with tempfile.TemporaryDirectory(prefix="keytap-bpf-") as headers:
        for name, text in (generated or {}).items():
            Path(headers, name).write_text(text)
        cflags = [f"-I{headers}", f"-I{BPF_SOURCE_DIR}"] + [
            f"-D{name}={value}" for name, value in defines.items()]
        return _compile(bcc, source, source_name, cflags)


def release_free_heap() -> None:
    """Hand glibc's free heap pages back to the system. Once the programs are compiled: LLVM's
    freed heap, ~35 MB of anonymous memory for the capture's whole life otherwise. Then now and
    then: packets of every size leave free pages inside the heap that glibc keeps, and a long
    capture's anonymous memory crept up ~0.3 MB a minute."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _compile(bcc: ModuleType, source: Path, source_name: str, cflags: list[str]) -> object:
    try:
        return bcc.BPF(src_file=str(source).encode(), cflags=cflags)
    except Exception as error:  # BCC raises bare Exception; its compiler output went to stderr
        raise KeytapError(f"BCC could not compile {source_name}: {error} "
                          f"(kernel headers: {os.environ.get('BCC_KERNEL_SOURCE', 'default')})"
                          ) from None
