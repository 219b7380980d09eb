#!/usr/bin/env python3
"""Generate offsets/openssl.json: byte offsets of OpenSSL's private TLS structs, per release.

keytap's uprobes read secrets straight out of ``SSL`` / ``SSL_SESSION`` memory, so they need
the exact layout of structs that OpenSSL never exports.  Rather than transcribing offsets by
hand, this tool asks the compiler: for every release tag it extracts the OpenSSL tree from a
git directory, configures it just far enough to generate the headers (no library build),
compiles a probe that includes ``ssl/ssl_local.h`` (``ssl_locl.h`` in old releases) with
``gcc -g``, and reads the member offsets from the probe's DWARF with pyelftools.  Each result
is cross-checked against ``offsetof()`` from a second tiny compiled program.

Identical layouts are stored once, keyed by a short hash, and every version records the tag
and commit it was generated from (provenance).  Existing entries in ``--out`` for other
versions, and the hand-curated ``build_ids`` section, are kept unless ``--replace`` is given.
A release whose tag the git directory lacks can be generated from upstream's release tarball
instead (``--tarball``); its entry then records the tarball's name and SHA-256, which must
equal the checksum upstream published.

Usage (see offsets/README.md)::

    .venv/bin/python tools/gen_offsets.py --source GITDIR --all
    .venv/bin/python tools/gen_offsets.py --source GITDIR --tags openssl-3.0.19 OpenSSL_1_1_1l
    .venv/bin/python tools/gen_offsets.py --source GITDIR --all --tarball openssl-4.0.2.tar.gz

The OpenSSL source is only ever unpacked under ``--workdir`` (a temporary directory by
default); nothing from it is written into this repository except the numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from elftools.elf.elffile import ELFFile

GENERATOR = "tools/gen_offsets.py 1"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "offsets" / "openssl.json"
DEFAULT_CONFIGURE_OPTS = "no-asm no-shared"

# Final releases only: no alphas, betas, -pre, -post-reformat or branch markers.
RELEASE_TAG_RE = re.compile(
    r"^(?:openssl-(?P<new>[34]\.\d+\.\d+)|OpenSSL_(?P<old>1_(?:0_2|1_0|1_1)[a-z]{0,2}))$"
)

# SHA-256 of upstream's release tarballs (openssl-X.Y.Z.tar.gz) that --tarball accepts, for
# releases whose tag the git directory may lack.  Each is the digest of upstream's unmodified
# tarball (OpenSSL's openssl-X.Y.Z.tar.gz.sha256, or Debian's byte-identical
# openssl_X.Y.Z.orig.tar.gz whose upstream signature verifies); a tarball with any other
# digest, e.g. a repacked or patched one, is refused.  Where each comes from: see
# offsets/README.md ("Releases from tarballs").
UPSTREAM_TARBALLS = {
    # Debian bookworm-security openssl 3.0.22-1~deb12u2 (signed Sources index), orig.tar.gz.asc
    # verified with OpenSSL's release key B146647E45A7B33947AB226B2A2C87D161692D40.
    "3.0.22": "67ebca7e50d17383028045486653492195b83db95f8558709701bb47b5c1ef81",
    # Debian experimental openssl 4.0.2-1, orig.tar.gz.asc verified with the same key.
    "4.0.2": "736b467530f916737b7031310ccb21d8218c6229e61e8e160cd1d3458cd543a8",
    # Debian experimental openssl 4.0.3-1 (signed Sources index; the file itself is not
    # served) and the cryptography 50.0.2 wheel's SBOM agree on this digest.
    "4.0.3": "325b5c806167c13b40b1ffeadfe0248197c00eccc4cf123ec1e28d2d2fd216d9",
}

# Layout fields, in output order.  Paths are "struct:member.member"; "conn" is the struct the
# application's SSL * points at (ssl_st up to 3.1, ssl_connection_st from 3.2), "s3" the
# SSLv3 state (pointer up to 1.1.1, embedded from 3.0), "session" SSL_SESSION, "cipher"
# SSL_CIPHER.  Offsets in conn are absolute from SSL *; s3/session/cipher ones are relative.
TLS13_ARRAYS = (
    "early_secret",
    "handshake_secret",
    "master_secret",
    "resumption_master_secret",
    "client_finished_secret",
    "server_finished_secret",
    "server_finished_hash",
    "handshake_traffic_hash",
    "client_app_traffic_secret",
    "server_app_traffic_secret",
    "exporter_master_secret",
    "early_exporter_master_secret",
)
OFFSET_FIELDS: dict[str, tuple[str, str]] = {
    "ssl_version": ("conn", "version"),
    "ssl_type": ("conn", "ssl.type"),
    "server": ("conn", "server"),
    "s3": ("conn", "s3"),
    "s3_client_random": ("s3", "client_random"),
    "s3_server_random": ("s3", "server_random"),
    "session": ("conn", "session"),
    "session_master_key": ("session", "master_key"),
    "session_master_key_length": ("session", "master_key_length"),
    "session_cipher": ("session", "cipher"),
    "session_cipher_id": ("session", "cipher_id"),
    "cipher_id": ("cipher", "id"),
    **{name: ("conn", name) for name in TLS13_ARRAYS},
}
# Sizes in bytes: the array lengths a reader must copy and the widths of integers whose type
# changed between releases (master_key_length: int up to 1.1.0, size_t from 1.1.1;
# SSL_CIPHER.id: unsigned long in 1.0.2, uint32_t from 1.1.0).
SIZE_FIELDS: dict[str, tuple[str, str]] = {
    "master_key_size": ("session", "master_key"),
    "secret_size": ("conn", "handshake_secret"),
    "session_master_key_length_size": ("session", "master_key_length"),
    "session_cipher_id_size": ("session", "cipher_id"),
    "cipher_id_size": ("cipher", "id"),
}
FIELDS: tuple[str, ...] = (
    *OFFSET_FIELDS,
    "s3_is_pointer",
    *SIZE_FIELDS,
    "ssl_size",
)
# Fields every supported release must have; anything else may be null.
REQUIRED = (
    "ssl_version",
    "server",
    "s3",
    "s3_client_random",
    "s3_server_random",
    "session",
    "session_master_key",
    "session_master_key_length",
    "session_cipher",
    "session_cipher_id",
    "cipher_id",
    "master_key_size",
    "ssl_size",
)


class GenError(RuntimeError):
    """A tag could not be processed; the message says which step failed."""


def tag_version(tag: str) -> str | None:
    """'openssl-3.0.19' -> '3.0.19', 'OpenSSL_1_1_1l' -> '1.1.1l'; None for non-releases."""
    m = RELEASE_TAG_RE.match(tag)
    if not m:
        return None
    return m.group("new") or m.group("old").replace("_", ".")


def version_key(version: str) -> tuple[int, int, int, str]:
    """Sort key: numeric major.minor.patch, then the 1.x letter suffix."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)([a-z]*)$", version)
    if not m:
        return (999, 0, 0, version)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4))


def version_tag(version: str) -> str:
    """Upstream's tag for a release: '3.0.19' -> 'openssl-3.0.19', '1.1.1l' -> 'OpenSSL_1_1_1l'."""
    return f"openssl-{version}" if version[0] != "1" else "OpenSSL_" + version.replace(".", "_")


def git(gitdir: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    kw.setdefault("check", False)
    return subprocess.run(["git", f"--git-dir={gitdir}", *args], **kw)


def list_release_tags(gitdir: Path) -> list[str]:
    """All final release tags from 1.0.2 on, oldest first."""
    out = git(gitdir, "tag", "--list", capture_output=True).stdout.decode()
    tags = [t for t in out.split() if tag_version(t)]
    return sorted(tags, key=lambda t: version_key(tag_version(t) or ""))


def extract(gitdir: Path, tag: str, dest: Path) -> str:
    """Unpack `tag` into dest and return its commit.

    Mirrors may lack some large blobs (test vectors); those are excluded from the archive
    rather than failing the whole extraction, since header generation never reads them.
    """
    res = git(gitdir, "rev-parse", f"{tag}^{{commit}}", capture_output=True)
    if res.returncode != 0:
        raise GenError(f"{tag}: unknown tag in {gitdir}")
    commit = res.stdout.decode().strip()
    tree = git(gitdir, "ls-tree", "-r", "-z", commit, capture_output=True, check=True).stdout
    blobs: list[tuple[str, str]] = []
    for entry in tree.split(b"\0"):
        if not entry:
            continue
        meta, path = entry.split(b"\t", 1)
        _mode, kind, sha = meta.split()
        if kind == b"blob":
            blobs.append((sha.decode(), path.decode()))
    check = git(
        gitdir,
        "cat-file",
        "--batch-check=%(objectname) %(objecttype)",
        input="".join(f"{sha}\n" for sha, _ in blobs).encode(),
        capture_output=True,
    ).stdout.decode()
    missing_shas = {ln.split()[0] for ln in check.splitlines() if ln.endswith(" missing")}
    excludes = [f":(exclude,literal){p}" for sha, p in blobs if sha in missing_shas]
    if any(p.startswith(("ssl/", "include/")) for sha, p in blobs if sha in missing_shas):
        raise GenError(f"{tag}: mirror lacks headers needed for the probe")
    dest.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", f"--git-dir={gitdir}", "archive", "--format=tar", commit, "--", ".", *excludes],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=False)
    assert archive.stdout is not None
    archive.stdout.close()
    err = archive.stderr.read().decode() if archive.stderr else ""
    if archive.wait() != 0 or untar.returncode != 0:
        raise GenError(f"{tag}: git archive failed: {err.strip()}")
    return commit


def tarball_version(tarball: Path) -> tuple[str, str, str]:
    """(version, top directory, sha256) of an upstream release tarball.

    The version is read from the tree itself (VERSION.dat from 3.0, the version text in
    include/openssl/opensslv.h before) and must be a final release; the SHA-256 must be the
    one upstream published for it (UPSTREAM_TARBALLS).
    """
    digest = hashlib.sha256()
    with tarball.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    sha256 = digest.hexdigest()
    with tarfile.open(tarball) as tf:
        names = tf.getnames()
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) != 1 or any(n.startswith("/") or ".." in n.split("/") for n in names):
            raise GenError(f"{tarball}: not a single openssl-X.Y.Z/ tree")
        top = tops.pop()

        def read(member: str) -> str | None:
            try:
                fh = tf.extractfile(f"{top}/{member}")
            except KeyError:
                return None
            return fh.read().decode(errors="replace") if fh else None

        version = None
        if (dat := read("VERSION.dat")) is not None:
            fields = dict(ln.split("=", 1) for ln in dat.splitlines() if "=" in ln)
            if fields.get("PRE_RELEASE_TAG") or fields.get("BUILD_METADATA"):
                raise GenError(f"{tarball}: not a final release: {dat.strip()!r}")
            version = f"{fields.get('MAJOR')}.{fields.get('MINOR')}.{fields.get('PATCH')}"
        elif (hdr := read("include/openssl/opensslv.h")) is not None:
            m = re.search(r'OPENSSL_VERSION_TEXT\s+"OpenSSL (\d+\.\d+\.\d+[a-z]*)\s', hdr)
            version = m.group(1) if m else None
    if version is None or tag_version(version_tag(version)) != version:
        raise GenError(f"{tarball}: cannot tell which release it is")
    if top != f"openssl-{version}":
        raise GenError(f"{tarball}: tree {top}/ does not match its version {version}")
    published = UPSTREAM_TARBALLS.get(version)
    if published is None:
        raise GenError(
            f"{tarball}: no published checksum for {version} in UPSTREAM_TARBALLS; add the "
            f"one from upstream's openssl-{version}.tar.gz.sha256 first"
        )
    if sha256 != published:
        raise GenError(
            f"{tarball}: sha256 {sha256} is not upstream's openssl-{version}.tar.gz ({published})"
        )
    return version, top, sha256


def extract_tarball(tarball: Path, top: str, dest: Path) -> None:
    """Unpack a release tarball's single top directory as dest."""
    dest.mkdir(parents=True)
    cmd = ["tar", "-x", "-f", str(tarball), "-C", str(dest), "--strip-components=1",
           "--no-same-owner", "--no-same-permissions", f"{top}/"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, check=False)
    if res.returncode != 0:
        raise GenError(f"{tarball}: tar failed: {res.stderr.decode().strip()}")


def run_logged(cmd: list[str], cwd: Path, log: Path, step: str) -> None:
    with log.open("ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        res = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if res.returncode != 0:
        raise GenError(f"{step} failed (exit {res.returncode}); see {log}")


def generate_headers(src: Path, configure_opts: str, log: Path) -> None:
    """Configure and generate just the headers the probe needs (no library build).

    1.0.2's Configure already runs `make links` (include/openssl symlinks and
    opensslconf.h); 1.1.x and 3.x need `make build_generated` for opensslconf.h /
    configuration.h and the headers made from *.h.in templates.
    """
    env = dict(os.environ, MAKEFLAGS="", MFLAGS="")
    # 1.1.0 to 1.1.0g import File::Glob's "glob", which Perl 5.30 stopped exporting; later
    # releases switched to bsd_glob, which behaves the same for Configure's use.  Only
    # Configure and the build.info files it evaluates matter for header generation.
    for script in [src / "Configure", *src.rglob("build.info")]:
        text = script.read_text(errors="surrogateescape")
        if "'File::Glob' => qw/glob/" in text:
            text = text.replace("'File::Glob' => qw/glob/", "'File::Glob' => qw/:bsd_glob/")
            script.write_text(text, errors="surrogateescape")
    cmd = ["perl", "Configure", "linux-x86_64", *configure_opts.split()]
    with log.open("ab") as fh:
        fh.write(f"$ {' '.join(cmd)}\n".encode())
        fh.flush()
        res = subprocess.run(
            cmd, cwd=src, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False
        )
    if res.returncode != 0:
        raise GenError(f"Configure failed; see {log}")
    makefile = (src / "Makefile").read_text(errors="replace")
    if re.search(r"^build_generated\s*:", makefile, re.M):
        run_logged(["make", "-s", "build_generated"], src, log, "make build_generated")
    elif not (src / "include" / "openssl" / "ssl.h").exists():
        run_logged(["make", "-s", "links"], src, log, "make links")


@dataclass
class ProbeSource:
    """Which private header and struct tags a given tree uses."""

    header: str
    conn_struct: str
    s3_struct: str | None  # named SSLv3 state struct when s3 is a pointer (up to 1.1.1)


def probe_source(src: Path) -> ProbeSource:
    for name in ("ssl/ssl_local.h", "ssl/ssl_locl.h"):
        if (src / name).exists():
            header = name
            break
    else:
        raise GenError("neither ssl/ssl_local.h nor ssl/ssl_locl.h exists")
    text = (src / header).read_text(errors="replace")
    conn = "ssl_connection_st" if "struct ssl_connection_st {" in text else "ssl_st"
    s3 = None if re.search(r"\}\s*s3\s*;", text) else "ssl3_state_st"
    return ProbeSource(header, conn, s3)


def include_flags(src: Path) -> list[str]:
    dirs = [".", "include", "ssl", "crypto/include", "crypto", "providers/common/include"]
    return [f"-I{d}" for d in dirs if (src / d).is_dir()]


def compile_probe(src: Path, ps: ProbeSource, log: Path) -> Path:
    """Compile a probe object whose DWARF describes the structs keytap reads."""
    lines = [
        f'#include "{ps.header}"',
        f"struct {ps.conn_struct} keytap_probe_conn;",
        "struct ssl_session_st keytap_probe_session;",
        "struct ssl_cipher_st keytap_probe_cipher;",
    ]
    if ps.s3_struct:
        lines.append(f"struct {ps.s3_struct} keytap_probe_s3;")
    (src / "keytap_probe.c").write_text("\n".join(lines) + "\n")
    obj = src / "keytap_probe.o"
    cmd = [
        "gcc", "-g", "-O0", "-fno-eliminate-unused-debug-types", "-w",
        *include_flags(src), "-c", "keytap_probe.c", "-o", obj.name,
    ]  # fmt: skip
    run_logged(cmd, src, log, "compiling the probe")
    return obj


# --- DWARF -------------------------------------------------------------------------------


class Dwarf:
    """Just enough DWARF walking to resolve member paths in the probe's struct types."""

    def __init__(self, obj: Path) -> None:
        self._fh = obj.open("rb")
        elf = ELFFile(self._fh)
        if not elf.has_dwarf_info():
            raise GenError(f"{obj}: no DWARF")
        self.dwarf = elf.get_dwarf_info()
        self.variables: dict[str, Any] = {}
        self.struct_defs: dict[str, Any] = {}
        for cu in self.dwarf.iter_CUs():
            for die in cu.iter_DIEs():
                name = self._name(die)
                if die.tag == "DW_TAG_variable" and name and name.startswith("keytap_probe_"):
                    self.variables[name] = die
                elif (
                    die.tag == "DW_TAG_structure_type"
                    and name
                    and "DW_AT_declaration" not in die.attributes
                ):
                    self.struct_defs.setdefault(name, die)

    def close(self) -> None:
        self._fh.close()

    @staticmethod
    def _name(die: Any) -> str | None:
        attr = die.attributes.get("DW_AT_name")
        return attr.value.decode() if attr else None

    def strip(self, die: Any) -> Any:
        """Follow typedefs and qualifiers to the underlying type; complete declarations."""
        while die.tag in (
            "DW_TAG_typedef",
            "DW_TAG_const_type",
            "DW_TAG_volatile_type",
            "DW_TAG_atomic_type",
        ):
            die = die.get_DIE_from_attribute("DW_AT_type")
        if die.tag == "DW_TAG_structure_type" and "DW_AT_declaration" in die.attributes:
            name = self._name(die)
            if name and name in self.struct_defs:
                die = self.struct_defs[name]
        return die

    def var_type(self, var: str) -> Any:
        die = self.variables.get(f"keytap_probe_{var}")
        if die is None:
            raise GenError(f"probe variable keytap_probe_{var} not in DWARF")
        return self.strip(die.get_DIE_from_attribute("DW_AT_type"))

    def _find_member(self, struct: Any, name: str) -> tuple[int, Any] | None:
        """Direct member, or one reached through anonymous struct/union members."""
        for child in struct.iter_children():
            if child.tag != "DW_TAG_member":
                continue
            loc = child.attributes.get("DW_AT_data_member_location")
            off = loc.value if loc is not None else 0
            if not isinstance(off, int):
                raise GenError(f"non-constant member location for {name}")
            cname = self._name(child)
            if cname == name:
                return off, child
            if cname is None:
                inner = self.strip(child.get_DIE_from_attribute("DW_AT_type"))
                if inner.tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
                    found = self._find_member(inner, name)
                    if found:
                        return off + found[0], found[1]
        return None

    def member(self, struct: Any, path: str) -> tuple[int, Any] | None:
        """(offset, member DIE) of a dotted path through embedded structs; None if absent."""
        total = 0
        die = None
        cur = struct
        for part in path.split("."):
            if cur.tag not in ("DW_TAG_structure_type", "DW_TAG_union_type"):
                return None
            found = self._find_member(cur, part)
            if found is None:
                return None
            total += found[0]
            die = found[1]
            cur = self.strip(die.get_DIE_from_attribute("DW_AT_type"))
        return total, die

    def byte_size(self, type_die: Any) -> int:
        type_die = self.strip(type_die)
        if type_die.tag == "DW_TAG_array_type":
            count = 1
            for sub in type_die.iter_children():
                if sub.tag != "DW_TAG_subrange_type":
                    continue
                if "DW_AT_count" in sub.attributes:
                    count *= sub.attributes["DW_AT_count"].value
                elif "DW_AT_upper_bound" in sub.attributes:
                    count *= sub.attributes["DW_AT_upper_bound"].value + 1
                else:
                    raise GenError("array without bound")
            return count * self.byte_size(type_die.get_DIE_from_attribute("DW_AT_type"))
        if "DW_AT_byte_size" in type_die.attributes:
            return int(type_die.attributes["DW_AT_byte_size"].value)
        if type_die.tag == "DW_TAG_pointer_type":
            return 8
        raise GenError(f"no size for {type_die.tag}")


def read_layout(obj: Path) -> dict[str, Any]:
    """Turn the probe's DWARF into one layout dict (keys in FIELDS order)."""
    dw = Dwarf(obj)
    try:
        structs = {
            "conn": dw.var_type("conn"),
            "session": dw.var_type("session"),
            "cipher": dw.var_type("cipher"),
        }
        s3 = dw.member(structs["conn"], "s3")
        if s3 is None:
            raise GenError("connection struct has no s3 member")
        s3_type = dw.strip(s3[1].get_DIE_from_attribute("DW_AT_type"))
        s3_is_pointer = s3_type.tag == "DW_TAG_pointer_type"
        if s3_is_pointer:
            s3_type = dw.strip(s3_type.get_DIE_from_attribute("DW_AT_type"))
        structs["s3"] = s3_type

        layout: dict[str, Any] = {}
        for field, (struct, path) in OFFSET_FIELDS.items():
            found = dw.member(structs[struct], path)
            layout[field] = found[0] if found else None
        layout["s3_is_pointer"] = s3_is_pointer
        for field, (struct, path) in SIZE_FIELDS.items():
            found = dw.member(structs[struct], path)
            layout[field] = (
                dw.byte_size(found[1].get_DIE_from_attribute("DW_AT_type")) if found else None
            )
        layout["ssl_size"] = dw.byte_size(structs["conn"])
    finally:
        dw.close()
    missing = [f for f in REQUIRED if layout[f] is None]
    if missing:
        raise GenError(f"required members not found: {', '.join(missing)}")
    return {f: layout[f] for f in FIELDS}


def offsetof_check(src: Path, ps: ProbeSource, layout: dict[str, Any], log: Path) -> None:
    """Cross-check a few DWARF offsets against the compiler's own offsetof()."""
    conn = f"struct {ps.conn_struct}"
    s3_prefix = "" if layout["s3_is_pointer"] else "s3."
    s3_struct = f"struct {ps.s3_struct}" if ps.s3_struct else conn
    checks = {
        "ssl_version": (conn, "version"),
        "server": (conn, "server"),
        "session": (conn, "session"),
        "s3": (conn, "s3"),
        "s3_client_random": (s3_struct, f"{s3_prefix}client_random"),
        "session_master_key": ("struct ssl_session_st", "master_key"),
        "session_cipher_id": ("struct ssl_session_st", "cipher_id"),
        "cipher_id": ("struct ssl_cipher_st", "id"),
    }
    if layout["client_app_traffic_secret"] is not None:
        checks["client_app_traffic_secret"] = (conn, "client_app_traffic_secret")
    body = [f'#include "{ps.header}"', "#include <stddef.h>", "#include <stdio.h>"]
    body.append("int main(void) {")
    for field, (st, member) in checks.items():
        body.append(f'    printf("{field} %zu\\n", offsetof({st}, {member}));')
    body.append(f'    printf("ssl_size %zu\\n", sizeof({conn}));')
    body += ["    return 0;", "}"]
    (src / "keytap_offsetof.c").write_text("\n".join(body) + "\n")
    cmd = ["gcc", "-w", *include_flags(src), "keytap_offsetof.c", "-o", "keytap_offsetof"]
    run_logged(cmd, src, log, "compiling the offsetof check")
    out = subprocess.run(
        [str(src / "keytap_offsetof")], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        field, value = line.split()
        expect = int(value)
        if field == "s3_client_random" and not layout["s3_is_pointer"]:
            expect -= layout["s3"]  # offsetof(conn, s3.client_random) is absolute
        if layout[field] != expect:
            raise GenError(f"DWARF says {field}={layout[field]} but offsetof() says {expect}")


def layout_hash(layout: dict[str, Any]) -> str:
    canon = json.dumps(layout, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


@dataclass
class Result:
    tag: str
    version: str
    provenance: dict[str, str]  # {"tag", "commit"}, or {"tag", "tarball", "sha256"}
    layout: dict[str, Any]


def process_tag(gitdir: Path, tag: str, workdir: Path, configure_opts: str, keep: bool) -> Result:
    version = tag_version(tag)
    if version is None:
        raise GenError(f"{tag}: not a release tag this tool understands")

    def unpack(src: Path) -> dict[str, str]:
        return {"tag": tag, "commit": extract(gitdir, tag, src)}

    return process_release(tag, version, unpack, workdir, configure_opts, keep)


def process_tarball(
    tarball: Path, version: str, top: str, sha256: str, workdir: Path, configure_opts: str,
    keep: bool,
) -> Result:  # fmt: skip
    """Like process_tag, from upstream's release tarball (already checked by tarball_version)."""

    def unpack(src: Path) -> dict[str, str]:
        extract_tarball(tarball, top, src)
        return {"tag": version_tag(version), "tarball": f"{top}.tar.gz", "sha256": sha256}

    return process_release(str(tarball), version, unpack, workdir, configure_opts, keep)


def process_release(
    name: str,
    version: str,
    unpack: Callable[[Path], dict[str, str]],
    workdir: Path,
    configure_opts: str,
    keep: bool,
) -> Result:
    """Unpack one release, generate its headers and read the layout from the probe."""
    src = workdir / f"openssl-{version}"
    if src.exists():
        shutil.rmtree(src)
    log = workdir / f"openssl-{version}.log"
    log.unlink(missing_ok=True)
    try:
        provenance = unpack(src)
        generate_headers(src, configure_opts, log)
        ps = probe_source(src)
        layout = read_layout(compile_probe(src, ps, log))
        offsetof_check(src, ps, layout, log)
    except GenError as exc:
        raise GenError(f"{name}: {exc}") from None
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as exc:
        raise GenError(f"{name}: {type(exc).__name__}: {exc}") from exc
    finally:
        if not keep:
            shutil.rmtree(src, ignore_errors=True)
    if not keep:
        log.unlink(missing_ok=True)
    return Result(provenance["tag"], version, provenance, layout)


# --- verification against a real binary ----------------------------------------------


def elf_build_id(path: Path) -> str | None:
    """GNU build id (lowercase hex), the key keytap's build_ids section uses."""
    with path.open("rb") as fh:
        elf = ELFFile(fh)
        for section in elf.iter_sections():
            if section.header.sh_type != "SHT_NOTE":
                continue
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
    return None


def hkdf_expand_label(secret: bytes, label: str, context: bytes, length: int) -> bytes:
    """TLS 1.3 HKDF-Expand-Label (RFC 8446 7.1); the hash is implied by len(secret)."""
    import hmac

    digest = {32: "sha256", 48: "sha384"}[len(secret)]
    full = b"tls13 " + label.encode()
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([i]), digest).digest()
        out += block
        i += 1
    return out[:length]


class LiveOpenSSL:
    """ctypes view of an OpenSSL already loaded in this process (1.1.1 or later).

    Symbols come either from a shared libssl (dlsym) or, for a statically linked copy such
    as the one inside a `cryptography` wheel, from that wheel's cffi bindings.
    """

    def __init__(self, libssl: Path | None) -> None:
        import ctypes

        self.ct = ctypes
        self._keep: list[Any] = []
        if libssl is not None:
            lib = ctypes.CDLL(str(libssl))
            self._addr = lambda name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
        else:
            from cryptography.hazmat.bindings.openssl.binding import Binding

            binding = Binding()
            ffi = binding.ffi
            clib = getattr(binding.lib, "_original_lib", binding.lib)
            self._addr = lambda name: int(ffi.cast("uintptr_t", ffi.addressof(clib, name)))
        # Reads go through /proc/self/mem so a wrong layout (a garbage pointer) reports a
        # mismatch instead of crashing the interpreter.
        self._mem = os.open("/proc/self/mem", os.O_RDONLY)

    def read(self, addr: int, n: int) -> bytes | None:
        """n bytes at addr in this process, or None if unmapped."""
        if addr <= 0 or addr + n >= 1 << 47:
            return None
        try:
            data = os.pread(self._mem, n, addr)
        except OSError:
            return None
        return data if len(data) == n else None

    def fn(self, name: str, restype: Any, *argtypes: Any) -> Any:
        try:
            addr = self._addr(name)
        except AttributeError:
            addr = None
        if not addr:
            raise GenError(f"symbol {name} not found")
        return self.ct.CFUNCTYPE(restype, *argtypes)(addr)

    def file_of(self, name: str) -> Path:
        """The ELF file that holds symbol `name` (dladdr), i.e. the binary keytap probes."""
        ct = self.ct

        class DlInfo(ct.Structure):
            _fields_: ClassVar = [
                ("dli_fname", ct.c_char_p),
                ("dli_fbase", ct.c_void_p),
                ("dli_sname", ct.c_char_p),
                ("dli_saddr", ct.c_void_p),
            ]

        libc = ct.CDLL(None)
        info = DlInfo()
        if not libc.dladdr(ct.c_void_p(self._addr(name)), ct.byref(info)):
            raise GenError("dladdr failed")
        return Path(info.dli_fname.decode()).resolve()


# SSL_CIPHER.id values (0x0300 + IANA code) of suites a default handshake may pick.
KNOWN_CIPHER_IDS = {
    "TLS_AES_128_GCM_SHA256": 0x03001301,
    "TLS_AES_256_GCM_SHA384": 0x03001302,
    "TLS_CHACHA20_POLY1305_SHA256": 0x03001303,
    "ECDHE-ECDSA-AES128-GCM-SHA256": 0x0300C02B,
    "ECDHE-ECDSA-AES256-GCM-SHA384": 0x0300C02C,
    "ECDHE-ECDSA-CHACHA20-POLY1305": 0x0300CCA9,
}


def _make_cert(tmp: Path) -> tuple[Path, Path]:
    """Throwaway self-signed EC certificate for the in-memory handshake."""
    key, crt = tmp / "key.pem", tmp / "crt.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=keytap-verify", "-days", "1",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, crt


def live_handshake(ossl: LiveOpenSSL, tls_version: int) -> dict[str, Any]:
    """Handshake a client and a server over memory BIOs; return the client's view.

    Returns the client SSL pointer plus what public APIs and the key log say, so that the
    bytes at the table's offsets can be compared with them.
    """
    ct = ossl.ct
    vp, cp, i, lng = ct.c_void_p, ct.c_char_p, ct.c_int, ct.c_long
    f = {
        "TLS_method": ossl.fn("TLS_method", vp),
        "SSL_CTX_new": ossl.fn("SSL_CTX_new", vp, vp),
        "SSL_CTX_use_certificate_file": ossl.fn("SSL_CTX_use_certificate_file", i, vp, cp, i),
        "SSL_CTX_use_PrivateKey_file": ossl.fn("SSL_CTX_use_PrivateKey_file", i, vp, cp, i),
        "SSL_CTX_set_keylog_callback": ossl.fn("SSL_CTX_set_keylog_callback", None, vp, vp),
        "SSL_new": ossl.fn("SSL_new", vp, vp),
        "SSL_set_bio": ossl.fn("SSL_set_bio", None, vp, vp, vp),
        "SSL_set_connect_state": ossl.fn("SSL_set_connect_state", None, vp),
        "SSL_set_accept_state": ossl.fn("SSL_set_accept_state", None, vp),
        "SSL_do_handshake": ossl.fn("SSL_do_handshake", i, vp),
        "BIO_s_mem": ossl.fn("BIO_s_mem", vp),
        "BIO_new": ossl.fn("BIO_new", vp, vp),
        "BIO_read": ossl.fn("BIO_read", i, vp, vp, i),
        "BIO_write": ossl.fn("BIO_write", i, vp, vp, i),
        "SSL_version": ossl.fn("SSL_version", i, vp),
        "SSL_get_session": ossl.fn("SSL_get_session", vp, vp),
        "SSL_get_current_cipher": ossl.fn("SSL_get_current_cipher", vp, vp),
        "SSL_CIPHER_get_name": ossl.fn("SSL_CIPHER_get_name", cp, vp),
        "SSL_get_client_random": ossl.fn("SSL_get_client_random", ct.c_size_t, vp, vp, ct.c_size_t),
        "SSL_get_server_random": ossl.fn("SSL_get_server_random", ct.c_size_t, vp, vp, ct.c_size_t),
        "SSL_SESSION_get_master_key": ossl.fn(
            "SSL_SESSION_get_master_key", ct.c_size_t, vp, vp, ct.c_size_t
        ),
    }  # fmt: skip
    try:
        ctrl = ossl.fn("SSL_CTX_ctrl", lng, vp, i, lng, vp)

        def set_proto(ctx: int, which: str, v: int) -> None:
            ctrl(ctx, 123 if which == "min" else 124, v, None)  # SSL_CTRL_SET_{MIN,MAX}_...

    except GenError:  # cffi bindings expose the SSL_CTX_set_*_proto_version macros instead

        def set_proto(ctx: int, which: str, v: int) -> None:
            ossl.fn(f"SSL_CTX_set_{which}_proto_version", lng, vp, i)(ctx, v)

    keylog: list[str] = []
    cb_type = ct.CFUNCTYPE(None, vp, cp)
    callback = cb_type(lambda _ssl, line: keylog.append(line.decode()))
    with tempfile.TemporaryDirectory(prefix="gen_offsets-verify-") as tmp:
        key, crt = _make_cert(Path(tmp))
        ends = {}
        for role in ("client", "server"):
            ctx = f["SSL_CTX_new"](f["TLS_method"]())
            set_proto(ctx, "min", tls_version)
            set_proto(ctx, "max", tls_version)
            if role == "server":
                if f["SSL_CTX_use_certificate_file"](ctx, str(crt).encode(), 1) != 1:
                    raise GenError("server certificate not accepted")
                if f["SSL_CTX_use_PrivateKey_file"](ctx, str(key).encode(), 1) != 1:
                    raise GenError("server key not accepted")
            else:
                f["SSL_CTX_set_keylog_callback"](ctx, ct.cast(callback, vp))
            ssl = f["SSL_new"](ctx)
            rbio, wbio = f["BIO_new"](f["BIO_s_mem"]()), f["BIO_new"](f["BIO_s_mem"]())
            f["SSL_set_bio"](ssl, rbio, wbio)
            (f["SSL_set_connect_state"] if role == "client" else f["SSL_set_accept_state"])(ssl)
            ends[role] = (ssl, rbio, wbio)
        buf = ct.create_string_buffer(1 << 16)
        done = {"client": False, "server": False}
        for _ in range(50):
            for role, peer in (("client", "server"), ("server", "client")):
                if not done[role]:
                    done[role] = f["SSL_do_handshake"](ends[role][0]) == 1
                while (n := f["BIO_read"](ends[role][2], buf, len(buf))) > 0:
                    f["BIO_write"](ends[peer][1], buf, n)
            if all(done.values()):
                break
        else:
            raise GenError("in-memory handshake did not complete")
        ossl._keep.append(ends)  # keep both ends alive while memory is inspected
        out: dict[str, Any] = {"server_ssl": ends["server"][0]}
        ssl = out["ssl"] = ends["client"][0]
        out["version"] = f["SSL_version"](ssl)
        out["session"] = f["SSL_get_session"](ssl)
        out["cipher"] = f["SSL_get_current_cipher"](ssl)
        try:  # not in every binding; the name is, and the few ids we can meet are known
            out["cipher_id"] = ossl.fn("SSL_CIPHER_get_id", ct.c_ulong, vp)(out["cipher"])
        except GenError:
            name = f["SSL_CIPHER_get_name"](out["cipher"]).decode()
            out["cipher_id"] = KNOWN_CIPHER_IDS.get(name)
        for what in ("client_random", "server_random"):
            n = f[f"SSL_get_{what}"](ssl, buf, 32)
            out[what] = buf.raw[:n]
        n = f["SSL_SESSION_get_master_key"](out["session"], buf, len(buf))
        out["master_key"] = buf.raw[:n]
    out["keylog"] = {}
    for line in keylog:
        label, _random, secret = line.split()
        out["keylog"][label] = bytes.fromhex(secret)
    return out


def _check_tls13(
    ssl: int,
    layout: dict[str, Any],
    keylog: dict[str, bytes],
    mem: Any,
    expect: Any,
) -> None:
    """TLS 1.3 arrays against the key log: the stored traffic secrets directly, and the
    handshake / master secrets through the HKDF derivations keytap itself performs."""
    n = len(keylog["CLIENT_TRAFFIC_SECRET_0"])

    def arr(field: str) -> bytes:
        return bytes(mem(ssl + layout[field], n))

    for field, label in (
        ("client_app_traffic_secret", "CLIENT_TRAFFIC_SECRET_0"),
        ("server_app_traffic_secret", "SERVER_TRAFFIC_SECRET_0"),
        ("exporter_master_secret", "EXPORTER_SECRET"),
    ):
        expect(f"TLS1.3 {field}", arr(field), keylog[label])
    thash = arr("handshake_traffic_hash")
    for hkdf_label, label in (
        ("c hs traffic", "CLIENT_HANDSHAKE_TRAFFIC_SECRET"),
        ("s hs traffic", "SERVER_HANDSHAKE_TRAFFIC_SECRET"),
    ):
        got = hkdf_expand_label(arr("handshake_secret"), hkdf_label, thash, n)
        expect(f"TLS1.3 handshake_secret+handshake_traffic_hash -> {label}", got, keylog[label])
    got = hkdf_expand_label(arr("master_secret"), "c ap traffic", arr("server_finished_hash"), n)
    expect(
        "TLS1.3 master_secret+server_finished_hash -> CLIENT_TRAFFIC_SECRET_0",
        got,
        keylog["CLIENT_TRAFFIC_SECRET_0"],
    )


def verify_layout(ossl: LiveOpenSSL, layout: dict[str, Any]) -> list[str]:
    """Compare a layout with a live OpenSSL; return the list of mismatches (empty = good)."""
    problems: list[str] = []

    def mem(addr: int, n: int) -> bytes:
        data = ossl.read(addr, n)
        return b"\0" * n if data is None else data

    def u(addr: int, n: int) -> int:
        return int.from_bytes(mem(addr, n), "little")

    def expect(name: str, got: Any, want: Any) -> None:
        if got != want:
            problems.append(f"{name}: memory has {got!r}, OpenSSL says {want!r}")

    tls13 = layout["client_app_traffic_secret"] is not None
    for tls_version in (0x0303, 0x0304) if tls13 else (0x0303,):
        hs = live_handshake(ossl, tls_version)
        ssl, v = hs["ssl"], f"TLS{'1.3' if tls_version == 0x0304 else '1.2'}"
        expect(f"{v} ssl_version", u(ssl + layout["ssl_version"], 4), hs["version"])
        if layout["ssl_type"] is not None:
            expect(f"{v} ssl_type", u(ssl + layout["ssl_type"], 4), 0)
        expect(f"{v} server(client)", u(ssl + layout["server"], 4), 0)
        expect(f"{v} server(server)", u(hs["server_ssl"] + layout["server"], 4), 1)
        s3 = u(ssl + layout["s3"], 8) if layout["s3_is_pointer"] else ssl + layout["s3"]
        for rnd in ("client_random", "server_random"):
            expect(f"{v} {rnd}", mem(s3 + layout[f"s3_{rnd}"], 32), hs[rnd])
        sess = u(ssl + layout["session"], 8)
        expect(f"{v} session", sess, hs["session"])
        mk_len = u(
            sess + layout["session_master_key_length"], layout["session_master_key_length_size"]
        )
        expect(f"{v} master_key_length", mk_len, len(hs["master_key"]))
        mk = mem(sess + layout["session_master_key"], mk_len)
        expect(f"{v} master_key", mk, hs["master_key"])
        cipher = u(sess + layout["session_cipher"], 8)
        expect(f"{v} session_cipher", cipher, hs["cipher"])
        if hs["cipher_id"] is None:
            problems.append(f"{v} cipher_id: cannot tell the negotiated suite's id")
        cid = u(cipher + layout["cipher_id"], layout["cipher_id_size"])
        expect(f"{v} cipher_id", cid, hs["cipher_id"])
        sess_cid = u(sess + layout["session_cipher_id"], layout["session_cipher_id_size"])
        if sess_cid not in (0, hs["cipher_id"]):
            problems.append(f"{v} session_cipher_id: {sess_cid:#x} is neither 0 nor the cipher id")
        kl = hs["keylog"]
        if tls_version == 0x0303:
            expect(f"{v} keylog CLIENT_RANDOM", kl.get("CLIENT_RANDOM"), hs["master_key"])
        else:
            _check_tls13(ssl, layout, kl, mem, expect)
    return problems


def run_verify(args: argparse.Namespace) -> int:
    """--verify-libssl / --verify-cryptography: check the table against a loaded OpenSSL."""
    import ctypes

    table = load_existing(args.out)
    ossl = LiveOpenSSL(args.verify_libssl)
    version_text = ossl.fn("OpenSSL_version", ctypes.c_char_p, ctypes.c_int)(0).decode()
    m = re.match(r"OpenSSL (\d+\.\d+\.\d+[a-z]*)", version_text)
    if not m:
        print(f"cannot parse version from {version_text!r}", file=sys.stderr)
        return 2
    version = m.group(1)
    binary = ossl.file_of("SSL_new")
    build_id = elf_build_id(binary)
    print(f"{binary}: {version_text} (build id {build_id})")
    if args.layout:
        chosen = args.layout
    elif build_id in table["build_ids"]:
        chosen = table["build_ids"][build_id]["layout"]
    elif version in table["versions"]:
        chosen = table["versions"][version]["layout"]
    else:
        print(f"{version} is not in {args.out}; pass --layout HASH to try one", file=sys.stderr)
        return 2
    if chosen not in table["layouts"]:
        print(f"layout {chosen} not in {args.out}", file=sys.stderr)
        return 2
    problems = verify_layout(ossl, table["layouts"][chosen])
    for p in problems:
        print(f"MISMATCH {p}")
    if problems:
        return 1
    print(f"OK: layout {chosen} matches the live {version} (TLS 1.2 and, if present, 1.3)")
    if args.add_build_id is not None:
        if build_id is None:
            print("binary has no GNU build id; nothing recorded", file=sys.stderr)
            return 1
        table["build_ids"][build_id] = {
            "version": version,
            "layout": chosen,
            "file": binary.name,
            "note": args.add_build_id or f"verified with --verify against {binary}",
        }
        data = {
            "generator": table.get("generator", GENERATOR),
            "layouts": table["layouts"],
            "versions": table["versions"],
            "build_ids": dict(sorted(table["build_ids"].items())),
        }
        args.out.write_text(dump(data))
        print(f"recorded build id {build_id} -> {chosen} in {args.out}")
    return 0


# --- output ------------------------------------------------------------------------------


def load_existing(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"layouts": {}, "versions": {}, "build_ids": {}}
    data = json.loads(path.read_text())
    for key in ("layouts", "versions", "build_ids"):
        data.setdefault(key, {})
    return data


def merge(
    existing: dict[str, Any], results: list[Result], configure_opts: str, replace: bool
) -> dict[str, Any]:
    """Combine new results with the kept parts of the old table; drop unused layouts."""
    layouts: dict[str, dict[str, Any]] = {} if replace else dict(existing["layouts"])
    versions: dict[str, dict[str, Any]] = {} if replace else dict(existing["versions"])
    for res in results:
        h = layout_hash(res.layout)
        layouts[h] = res.layout
        versions[res.version] = {
            **res.provenance,
            "configure": f"linux-x86_64 {configure_opts}",
            "layout": h,
        }
    build_ids = dict(existing.get("build_ids", {}))
    used = {v["layout"] for v in versions.values()} | {b["layout"] for b in build_ids.values()}
    ordered_versions = {k: versions[k] for k in sorted(versions, key=version_key)}
    first_use: dict[str, int] = {}
    for i, v in enumerate(ordered_versions.values()):
        first_use.setdefault(v["layout"], i)
    ordered_layouts = {
        h: layouts[h]
        for h in sorted(used, key=lambda h: (first_use.get(h, len(first_use)), h))
        if h in layouts
    }
    return {
        "generator": GENERATOR,
        "layouts": ordered_layouts,
        "versions": ordered_versions,
        "build_ids": build_ids,
    }


def dump(data: dict[str, Any]) -> str:
    """JSON with one layout / version per line block, readable in diffs."""
    return json.dumps(data, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, help="OpenSSL git dir (bare is fine)")
    sel = ap.add_mutually_exclusive_group()
    sel.add_argument("--tags", nargs="+", metavar="TAG", help="release tags to generate")
    sel.add_argument("--all", action="store_true", help="every release from 1.0.2 on")
    sel.add_argument(
        "--verify-libssl",
        type=Path,
        metavar="LIBSSL",
        help="instead of generating: handshake with this shared libssl and check the table",
    )
    sel.add_argument(
        "--verify-cryptography",
        action="store_true",
        help="likewise, with the OpenSSL statically linked into the importable `cryptography`",
    )
    ap.add_argument(
        "--tarball",
        nargs="+",
        type=Path,
        default=[],
        metavar="TARBALL",
        help="also generate from these upstream release tarballs (openssl-X.Y.Z.tar.gz, "
        "checked against UPSTREAM_TARBALLS); skipped where the selected tags have the release",
    )
    ap.add_argument("--layout", help="verify this layout hash instead of looking one up")
    ap.add_argument(
        "--add-build-id",
        nargs="?",
        const="",
        metavar="NOTE",
        help="after a successful verify, record the binary's build id in build_ids",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    ap.add_argument("--workdir", type=Path, help="where trees are unpacked (default: a tmpdir)")
    ap.add_argument("--keep", action="store_true", help="keep unpacked trees and logs")
    ap.add_argument(
        "--configure-opts",
        default=DEFAULT_CONFIGURE_OPTS,
        help=f"options after 'Configure linux-x86_64' (default: {DEFAULT_CONFIGURE_OPTS!r})",
    )
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--replace", action="store_true", help="drop versions not generated in this run"
    )
    args = ap.parse_args(argv)
    if args.verify_libssl or args.verify_cryptography:
        if args.tarball:
            ap.error("--tarball generates; it does not go with --verify-*")
        return run_verify(args)
    if not (args.tags or args.all or args.tarball):
        ap.error("one of --tags, --all, --tarball, --verify-libssl, --verify-cryptography")
    if (args.tags or args.all) and args.source is None:
        ap.error("--source GITDIR is required to generate from tags")

    gitdir: Path = args.source
    tags = (list_release_tags(gitdir) if args.all else args.tags) or []
    for t in tags:
        if tag_version(t) is None:
            ap.error(f"{t}: not a release tag (expected openssl-X.Y.Z or OpenSSL_1_x_yz)")
    tag_versions = {tag_version(t) for t in tags}
    tarballs: list[tuple[Path, str, str, str]] = []
    for tarball in args.tarball:
        try:
            version, top, sha256 = tarball_version(tarball)
        except (GenError, OSError, tarfile.TarError) as exc:
            ap.error(str(exc))
        if version in tag_versions:
            print(f"skip {tarball}: the selected tags have {version}", file=sys.stderr)
        elif version in {t[1] for t in tarballs}:
            ap.error(f"{tarball}: a second tarball of {version}")
        else:
            tarballs.append((tarball, version, top, sha256))
    if not tags and not tarballs:
        ap.error("nothing selected")

    tmp = None
    if args.workdir:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gen_offsets-")
        workdir = Path(tmp.name)
    results: list[Result] = []
    failures: list[str] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            opts, keep = args.configure_opts, args.keep
            futs = [pool.submit(process_tag, gitdir, t, workdir, opts, keep) for t in tags]
            futs += [
                pool.submit(process_tarball, *tarball, workdir, opts, keep) for tarball in tarballs
            ]
            for fut in concurrent.futures.as_completed(futs):
                try:
                    res = fut.result()
                except GenError as exc:
                    failures.append(str(exc))
                    print(f"FAIL {exc}", file=sys.stderr)
                    continue
                results.append(res)
                where = res.provenance.get("tarball", res.tag)
                print(f"ok   {res.version:<8} {where:<16} {layout_hash(res.layout)}")
    finally:
        if tmp is not None:
            tmp.cleanup()

    if results:
        data = merge(load_existing(args.out), results, args.configure_opts, args.replace)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(dump(data))
        print(f"wrote {args.out}: {len(data['versions'])} versions, {len(data['layouts'])} layouts")
    if failures:
        print(f"{len(failures)} tag(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
