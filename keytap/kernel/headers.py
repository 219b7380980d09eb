"""Find kernel headers BCC can compile against, also when the running kernel's are missing.

BCC looks only at /lib/modules/$(uname -r)/build (or $BCC_KERNEL_SOURCE, one directory). Real
nodes often run a kernel whose headers are not installed, and Debian splits its headers into an
arch tree (`linux-headers-X-amd64`: generated files, .config) and a shared tree
(`linux-headers-X-common`: include/, arch/*/include). keytap's BPF programs use only UAPI types
(TC and uprobes touch no kernel-internal structs), so any reasonably recent header set works: we
merge the two Debian trees into one directory of symlinks and point BCC_KERNEL_SOURCE at it.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MODULES_DIR = Path("/lib/modules")
SOURCES_DIR = Path("/usr/src")
CACHE_DIR = Path("/var/cache/keytap/kernel-headers")
INSTALL_HINT = "apt-get install linux-headers-amd64 (Debian/Ubuntu: linux-headers-$(uname -r))"


class KernelHeadersMissing(RuntimeError):
    """No usable kernel headers; the message says what to install."""


@dataclass(frozen=True)
class HeaderTree:
    """One set of headers: the arch-specific tree and, on Debian, its shared `-common` tree."""

    arch_dir: Path
    common_dir: Path | None

    @property
    def name(self) -> str:
        return self.arch_dir.name

    @property
    def version(self) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", self.name))


def _is_complete(directory: Path) -> bool:
    return (directory / "include" / "linux" / "kconfig.h").is_file() and (
        directory / "include" / "generated" / "autoconf.h"
    ).is_file()


def find_header_trees(sources_dir: Path | None = None) -> list[HeaderTree]:
    """Installed header trees under `sources_dir` (default SOURCES_DIR), newest first."""
    sources_dir = SOURCES_DIR if sources_dir is None else sources_dir
    trees = []
    for arch_dir in sorted(sources_dir.glob("linux-headers-*")):
        if not (arch_dir / "include" / "generated" / "autoconf.h").is_file():
            continue  # a -common tree, or an unconfigured one
        common = arch_dir.with_name(re.sub(r"-[^-]+$", "-common", arch_dir.name))
        trees.append(HeaderTree(arch_dir, common if common.is_dir() else None))
    return sorted(trees, key=lambda t: t.version, reverse=True)


def _merge_symlink_tree(destination: Path, sources: Iterable[Path]) -> None:
    """Make `destination` show the union of `sources`, later sources winning on clashes."""
    destination.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[Path]] = {}
    for source in sources:
        for child in source.iterdir():
            entries.setdefault(child.name, []).append(child)
    for name, paths in entries.items():
        if len(paths) > 1 and all(p.is_dir() for p in paths):
            _merge_symlink_tree(destination / name, paths)
        else:
            (destination / name).symlink_to(paths[-1].resolve())


def merged_tree(tree: HeaderTree, cache_dir: Path | None = None) -> Path:
    """One directory BCC can use for `tree`, built once (atomically) and reused."""
    cache_dir = CACHE_DIR if cache_dir is None else cache_dir
    if tree.common_dir is None:
        return tree.arch_dir
    target = cache_dir / tree.name
    if _is_complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{tree.name}.", dir=cache_dir))
    try:
        staging.chmod(0o755)
        _merge_symlink_tree(staging, [tree.common_dir, tree.arch_dir])
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # left incomplete by an interrupted keytap
        staging.rename(target)
    except OSError:
        if not _is_complete(target):  # else another keytap won the race: use its tree
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def configure_bcc_headers(environ: dict[str, str] | None = None) -> Path | None:
    """Set BCC_KERNEL_SOURCE when the running kernel's headers are missing.

    Returns the directory chosen (None when BCC will find the running kernel's own headers).
    Raises KernelHeadersMissing with an install hint when there is nothing usable.
    """
    env = os.environ if environ is None else environ
    if env.get("BCC_KERNEL_SOURCE"):
        return Path(env["BCC_KERNEL_SOURCE"])
    if (MODULES_DIR / os.uname().release / "build" / "include").is_dir():
        return None
    trees = find_header_trees()
    if not trees:
        raise KernelHeadersMissing(
            f"no kernel headers found for kernel {os.uname().release} (BCC needs them): "
            f"install them with: {INSTALL_HINT}"
        )
    try:
        chosen = merged_tree(trees[0])
    except OSError:  # a read-only /var (a container's read-only root): a private tree for
        private = Path(tempfile.mkdtemp(prefix="keytap-headers-"))  # this run, removed after
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        try:
            chosen = merged_tree(trees[0], private)
        except OSError as error:
            raise KernelHeadersMissing(
                f"cannot assemble the kernel headers of {trees[0].arch_dir} for BCC ({error}): "
                f"make {CACHE_DIR.parent} or {tempfile.gettempdir()} writable") from None
    env["BCC_KERNEL_SOURCE"] = str(chosen)
    return chosen
