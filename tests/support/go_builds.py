"""Go toolchains and the lab's Go peer (go_peer/main.go), built in every variant keytap meets.

Three toolchains: Debian's own `golang-go` (bookworm: 1.19, from `tools/setup`), and two of
other suites (UNPACKED): trixie's golang-1.24 (a recent Go, X25519MLKEM768 by default) and
bullseye's golang-1.15 (older than Go 1.17's register ABI: arguments on the stack), unpacked
with `dpkg -x` after the signed index checks every byte (tests.support.debian_suites), never
installed. Builds are cached by toolchain, variant and source hash under
~/.cache/keytap-go; a missing toolchain raises GoBuildError: tests fail on it, never skip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.debian_suites import SuiteError, unpack_packages
from tests.support.matrix_env import locked, run_checked

SOURCE = Path(__file__).parent / "go_peer" / "main.go"
CACHE = Path.home() / ".cache" / "keytap-go"
# toolchain -> a suite, and the Go release its golang-X.Y packages carry
UNPACKED = {"newer": ("trixie", "1.24"), "stack-abi": ("bullseye", "1.15")}
VARIANTS = {  # name -> go build arguments
    "plain": (),
    "stripped": ("-ldflags=-s -w",),
    "pie": ("-buildmode=pie",),
    "pie-stripped": ("-buildmode=pie", "-ldflags=-s -w"),
}


class GoBuildError(Exception):
    """A Go toolchain or build is missing or failed; the message says why."""


@dataclass(frozen=True)
class GoPeer:
    """One build of the lab's Go peer."""

    path: Path
    go_version: str  # "go1.19.8"
    variant: str


def goroot(toolchain: str) -> Path:
    """"system" (Debian's golang-go, from tools/setup), or one of UNPACKED."""
    if toolchain == "system":
        go = shutil.which("go")
        if go is None:
            raise GoBuildError("no `go` on PATH: tools/setup installs Debian's golang-go")
        return Path(os.path.realpath(go)).parent.parent
    suite, release = UNPACKED[toolchain]
    root = CACHE / f"{suite}-golang-{release}"
    with locked(CACHE / f"{suite}.lock"):
        if not (root / ".ready").exists():
            shutil.rmtree(root, ignore_errors=True)
            CACHE.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{suite}.", dir=CACHE))
            try:
                (work / "root").mkdir()
                unpack_packages(suite, (f"golang-{release}-go", f"golang-{release}-src"),
                                work / "root", work)
                (work / "root" / ".ready").write_text("")
                (work / "root").rename(root)
            except SuiteError as error:
                raise GoBuildError(f"Go {release} from {suite}: {error}") from error
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return root / "usr" / "lib" / f"go-{release}"


def go_peer(toolchain: str, variant: str) -> GoPeer:
    """The Go peer built by `toolchain` in `variant` (a VARIANTS key), cached."""
    root = goroot(toolchain)
    env = {"PATH": f"{root / 'bin'}:/usr/bin:/bin", "HOME": str(CACHE), "GOROOT": str(root),
           "GOCACHE": str(CACHE / "gocache"), "GO111MODULE": "off", "GOTOOLCHAIN": "local",
           "CGO_ENABLED": "0", "GOFLAGS": ""}
    # "go version go1.15.15 linux/amd64" (`go env GOVERSION` says nothing before Go 1.16)
    version = run_checked("env", *(f"{k}={v}" for k, v in env.items()), str(root / "bin" / "go"),
                          "version", error=GoBuildError).stdout.split()[2]
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    output = CACHE / "builds" / f"{version}-{variant}-{digest}" / "go-peer"
    with locked(CACHE / "builds.lock"):
        if not output.exists():
            output.parent.mkdir(parents=True, exist_ok=True)
            partial = output.with_suffix(".partial")
            run_checked("env", *(f"{k}={v}" for k, v in env.items()), str(root / "bin" / "go"),
                        "build", "-trimpath", *VARIANTS[variant], "-o", str(partial),
                        str(SOURCE), timeout=600, error=GoBuildError)
            partial.rename(output)
    return GoPeer(output, version, variant)
