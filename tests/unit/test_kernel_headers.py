"""kernel_headers: finding header trees, merging Debian's split trees, pointing BCC at them.

Everything happens in fake trees under tmp_path; the real /usr/src, /lib/modules and
/var/cache/keytap are never read or written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from keytap.kernel import headers as kernel_headers
from keytap.kernel.headers import (
    HeaderTree,
    KernelHeadersMissing,
    configure_bcc_headers,
    find_header_trees,
    merged_tree,
)


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def debian_pair(sources: Path, version: str, arch: str = "amd64") -> tuple[Path, Path]:
    """A Debian split: `-<arch>` holds generated files, `-common` the shared include/ trees."""
    arch_dir = sources / f"linux-headers-{version}-{arch}"
    common = sources / f"linux-headers-{version}-common"
    touch(arch_dir / "include" / "generated" / "autoconf.h", f"/* {version} autoconf */")
    touch(arch_dir / "include" / "config" / "auto.conf")
    touch(arch_dir / "arch" / "x86" / "include" / "generated" / "asm" / "cpufeaturemasks.h")
    touch(arch_dir / "Makefile", "arch Makefile")
    touch(arch_dir / ".config", "CONFIG_BPF=y")
    touch(common / "include" / "linux" / "kconfig.h", f"/* {version} kconfig */")
    touch(common / "include" / "uapi" / "linux" / "bpf.h")
    touch(common / "arch" / "x86" / "include" / "asm" / "ptrace.h")
    touch(common / "arch" / "x86" / "include" / "uapi" / "asm" / "ptrace.h")
    touch(common / "Makefile", "common Makefile")
    for tree in (arch_dir, common):  # as in Debian; dangling here, which must not matter
        (tree / "scripts").symlink_to("../../lib/linux-kbuild-6.1/scripts")
    return arch_dir, common


def single_tree(sources: Path, name: str) -> Path:
    """A self-contained (non-split) tree, as a kernel built from source leaves it."""
    tree = sources / name
    touch(tree / "include" / "generated" / "autoconf.h")
    touch(tree / "include" / "linux" / "kconfig.h")
    return tree


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point every system path kernel_headers uses into tmp_path."""
    paths = {name: tmp_path / name for name in ("src", "modules", "cache")}
    for path in paths.values():
        path.mkdir()
    monkeypatch.setattr(kernel_headers, "SOURCES_DIR", paths["src"])
    monkeypatch.setattr(kernel_headers, "MODULES_DIR", paths["modules"])
    monkeypatch.setattr(kernel_headers, "CACHE_DIR", paths["cache"])
    return paths


def test_find_header_trees_newest_first_with_common_dirs(dirs: dict[str, Path]) -> None:
    src = dirs["src"]
    old_arch, old_common = debian_pair(src, "5.10.0-30")
    new_arch, new_common = debian_pair(src, "6.1.0-56")
    single = single_tree(src, "linux-headers-5.15.0-custom")
    (src / "linux-headers-6.2.0-1-amd64" / "include").mkdir(parents=True)  # no autoconf.h

    trees = find_header_trees()

    assert trees == [
        HeaderTree(new_arch, new_common),
        HeaderTree(single, None),
        HeaderTree(old_arch, old_common),
    ]
    assert trees[0].name == "linux-headers-6.1.0-56-amd64"


def test_find_header_trees_ignores_lone_common_tree(dirs: dict[str, Path]) -> None:
    _, common = debian_pair(dirs["src"], "6.1.0-56")
    (dirs["src"] / "linux-headers-6.1.0-56-amd64" / "include" / "generated" / "autoconf.h").unlink()
    assert common.is_dir()
    assert find_header_trees() == []


def test_arch_tree_without_common_tree_is_used_alone(dirs: dict[str, Path]) -> None:
    arch_dir, common = debian_pair(dirs["src"], "6.1.0-56")
    for path in sorted(common.rglob("*"), reverse=True):
        path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
    common.rmdir()
    assert find_header_trees() == [HeaderTree(arch_dir, None)]


def test_merged_tree_resolves_both_halves(dirs: dict[str, Path]) -> None:
    arch_dir, common = debian_pair(dirs["src"], "6.1.0-56")
    merged = merged_tree(HeaderTree(arch_dir, common))

    assert merged == dirs["cache"] / arch_dir.name
    assert (merged / "include" / "linux" / "kconfig.h").read_text() == "/* 6.1.0-56 kconfig */"
    assert (merged / "include" / "generated" / "autoconf.h").read_text() == (
        "/* 6.1.0-56 autoconf */")
    x86 = merged / "arch" / "x86" / "include"
    assert (x86 / "asm" / "ptrace.h").is_file()
    assert (x86 / "uapi" / "asm" / "ptrace.h").is_file()
    assert (x86 / "generated" / "asm" / "cpufeaturemasks.h").is_file()
    assert (merged / "Makefile").read_text() == "arch Makefile"  # the arch tree wins a clash
    assert (merged / ".config").is_file()
    assert oct(merged.stat().st_mode & 0o777) == oct(0o755)
    assert [p.name for p in dirs["cache"].iterdir()] == [arch_dir.name]  # no staging left


def test_merged_tree_is_reused(dirs: dict[str, Path]) -> None:
    tree = HeaderTree(*debian_pair(dirs["src"], "6.1.0-56"))
    first = merged_tree(tree)
    marker = touch(first / "built-once")

    assert merged_tree(tree) == first
    assert marker.exists()
    assert [p.name for p in dirs["cache"].iterdir()] == [first.name]


def test_merged_tree_of_single_tree_is_the_tree(dirs: dict[str, Path]) -> None:
    tree = single_tree(dirs["src"], "linux-headers-6.1.0-custom")
    assert merged_tree(HeaderTree(tree, None)) == tree
    assert list(dirs["cache"].iterdir()) == []


def test_configure_sets_bcc_kernel_source_to_newest(dirs: dict[str, Path]) -> None:
    debian_pair(dirs["src"], "5.10.0-30")
    debian_pair(dirs["src"], "6.1.0-56")
    env: dict[str, str] = {}

    chosen = configure_bcc_headers(env)

    assert chosen == dirs["cache"] / "linux-headers-6.1.0-56-amd64"
    assert env == {"BCC_KERNEL_SOURCE": str(chosen)}
    assert (chosen / "include" / "linux" / "kconfig.h").is_file()
    assert configure_bcc_headers({}) == chosen  # second call: the same, already built tree


def test_configure_respects_preset_bcc_kernel_source(dirs: dict[str, Path]) -> None:
    debian_pair(dirs["src"], "6.1.0-56")
    env = {"BCC_KERNEL_SOURCE": "/opt/my-headers"}

    assert configure_bcc_headers(env) == Path("/opt/my-headers")
    assert env == {"BCC_KERNEL_SOURCE": "/opt/my-headers"}
    assert list(dirs["cache"].iterdir()) == []


def test_configure_leaves_running_kernels_headers_to_bcc(dirs: dict[str, Path]) -> None:
    debian_pair(dirs["src"], "6.1.0-56")
    (dirs["modules"] / os.uname().release / "build" / "include").mkdir(parents=True)
    env: dict[str, str] = {}

    assert configure_bcc_headers(env) is None
    assert env == {}


def test_configure_without_headers_says_what_to_install(dirs: dict[str, Path]) -> None:
    env: dict[str, str] = {}
    with pytest.raises(KernelHeadersMissing) as raised:
        configure_bcc_headers(env)
    assert "apt-get install linux-headers" in str(raised.value)
    assert os.uname().release in str(raised.value)
    assert env == {}


def test_module_constants_are_honoured_at_call_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian_pair(tmp_path / "src", "9.9.0-1")
    monkeypatch.setattr(kernel_headers, "SOURCES_DIR", tmp_path / "src")
    assert [t.name for t in find_header_trees()] == ["linux-headers-9.9.0-1-amd64"]


def test_configure_with_a_read_only_cache_uses_a_private_tree_for_the_run(
        dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    debian_pair(dirs["src"], "6.1.0-56")
    blocker = dirs["cache"] / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setattr(kernel_headers, "CACHE_DIR", blocker / "kernel-headers")  # mkdir fails
    removals: list[tuple] = []
    monkeypatch.setattr(kernel_headers.atexit, "register", lambda *call, **kw: removals.append(
        call))
    env: dict[str, str] = {}

    chosen = configure_bcc_headers(env)

    assert (chosen / "include" / "linux" / "kconfig.h").is_file()
    assert env == {"BCC_KERNEL_SOURCE": str(chosen)}
    private = chosen.parent
    assert private.name.startswith("keytap-headers-") and private.stat().st_mode & 0o077 == 0
    assert removals == [(shutil.rmtree, private)]
    shutil.rmtree(private)
