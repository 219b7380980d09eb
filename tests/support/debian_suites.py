"""OpenSSL of other Debian suites, unpacked and run through that suite's own dynamic loader.

A cheap stand-in for "a container of another distribution": the suite's `openssl`, its libssl
package (`libssl3t64`, `libssl4`, whatever `openssl` depends on) and its `libc6` are
downloaded from deb.debian.org and unpacked with `dpkg -x` (never installed). Their programs
run as `<root>/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path <root>/usr/lib/
x86_64-linux-gnu:<root>/lib/x86_64-linux-gnu <root>/usr/bin/openssl ...`, so that the process
maps the suite's libssl, libcrypto and libc (libz and libzstd, which no test looks at, come
from the host), with the suite's own openssl.cnf.

Every byte is checked before it is unpacked: the suite's InRelease with gpgv against Debian's
archive keyring, Packages.xz against the SHA256 that the signed text names, each .deb against
the SHA256 of its Packages stanza. The package versions are whatever the suite lists at the
time: nothing here names one.

One root per suite under ~/.cache/keytap-suites/<suite>, made once and reused by later runs
(delete the directory to take what the suite serves now): it is built beside, renamed into
place and marked by a `.ready` file (JSON: what was unpacked). A suite that cannot be
fetched or checked raises SuiteError with what went wrong (a 404 from the pool included):
tests fail on it, they never skip.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.matrix_env import locked, run_checked

MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
CACHE = Path.home() / ".cache" / "keytap-suites"
INDEX = "main/binary-amd64/Packages.xz"
MULTIARCH = "x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"
TIMEOUT_S = 120


class SuiteError(Exception):
    """A suite's OpenSSL could not be fetched, checked or run; the message says why."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str  # Debian's, e.g. "3.5.9-1~deb13u1"
    filename: str  # the pool path
    sha256: str
    size: int


@dataclass(frozen=True)
class SuiteOpenssl:
    """A suite's OpenSSL, unpacked: how to run its `openssl` and which files it maps."""

    suite: str
    root: Path
    packages: dict[str, str]  # package -> Debian version, as unpacked
    release: str  # what `openssl version` says, e.g. "OpenSSL 3.6.5 29 Sep 2026"

    @property
    def version(self) -> str:
        """The upstream release its `openssl version` names, e.g. "3.6.5"."""
        return self.release.split()[1]

    @property
    def library_dirs(self) -> tuple[Path, ...]:
        return self.root / "usr" / "lib" / MULTIARCH, self.root / "lib" / MULTIARCH

    @property
    def loader(self) -> Path:
        """The suite's dynamic loader, the file itself (/lib64's name is a symlink to it)."""
        for directory in self.library_dirs:
            if (directory / LOADER).is_file() and not (directory / LOADER).is_symlink():
                return directory / LOADER
        raise SuiteError(f"{self.suite}: no {LOADER} in {self.root} after dpkg -x")

    @property
    def libssl(self) -> Path:
        """The libssl file its `openssl` maps (what keytap must find and probe)."""
        found = [path for directory in self.library_dirs
                 for path in sorted(directory.glob("libssl.so.*"))]
        if len(found) != 1:
            raise SuiteError(f"{self.suite}: expected one libssl in {self.root}, "
                             f"found {[path.name for path in found]}")
        return found[0]

    def command(self, *args: str) -> list[str]:
        """The suite's `openssl ARGS` through the suite's loader, libraries and config."""
        return ["env", f"OPENSSL_CONF={self.root / 'etc' / 'ssl' / 'openssl.cnf'}",
                str(self.loader), "--library-path", ":".join(map(str, self.library_dirs)),
                str(self.root / "usr" / "bin" / "openssl"), *args]


def suite_openssl(suite: str) -> SuiteOpenssl:
    """The suite's OpenSSL, downloaded, checked and unpacked on first use."""
    directory = CACHE / suite
    with locked(CACHE / f"{suite}.lock"):
        ready = directory / ".ready"
        if not ready.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a half-made one of an earlier run
            _build(suite, directory)
        info = json.loads(ready.read_text())
    return SuiteOpenssl(suite, directory / "root", info["packages"], info["release"])


def _build(suite: str, directory: Path) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{suite}.", dir=CACHE))
    try:
        packages, signed = _packages(suite, work)
        root = work / "root"
        root.mkdir()
        for package in packages.values():
            deb = work / Path(package.filename).name
            _download_checked(package.filename, deb, package.sha256, package.size)
            _run("dpkg", "-x", str(deb), str(root))
            deb.unlink()
        release = _check_runs(SuiteOpenssl(suite, root, {}, ""), packages)
        # when the index was signed; Valid-Until is not enforced (a mirror may lag behind)
        dates = dict(re.findall(r"^(Date|Valid-Until): (.*)$", signed, re.MULTILINE))
        info = {"suite": suite, "release": release, "index_signed": dates,
                "packages": {name: package.version for name, package in packages.items()},
                "files": {name: package.filename for name, package in packages.items()}}
        # .ready written last inside, then one rename: a directory named <suite> is complete
        (work / ".ready").write_text(json.dumps(info, indent=1) + "\n")
        work.rename(directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def unpack_packages(suite: str, names: tuple[str, ...], root: Path, work: Path
                    ) -> dict[str, str]:
    """The suite's newest amd64 `names`, checked against its signed index and unpacked with
    `dpkg -x` into `root`; returns package -> Debian version."""
    stanzas, _ = _index(suite, work)
    unpacked = {}
    for name in names:
        package = _newest(stanzas, name, suite)
        deb = work / Path(package.filename).name
        _download_checked(package.filename, deb, package.sha256, package.size)
        _run("dpkg", "-x", str(deb), str(root))
        deb.unlink()
        unpacked[name] = package.version
    return unpacked


def _index(suite: str, work: Path) -> tuple[list[dict[str, str]], str]:
    """The stanzas of the suite's checked package index, and the signed InRelease text."""
    inrelease = work / "InRelease"
    _download(f"dists/{suite}/InRelease", inrelease)
    signed = _verified_text(inrelease, work / "Release")
    sha256, size = _index_checksum(signed, suite)
    index = work / "Packages.xz"
    _download_checked(f"dists/{suite}/{INDEX}", index, sha256, size)
    return _stanzas(lzma.decompress(index.read_bytes()).decode()), signed


def _packages(suite: str, work: Path) -> tuple[dict[str, Package], str]:
    """openssl, the libssl package it depends on, and libc6, from the suite's checked index;
    and the signed InRelease text."""
    stanzas, signed = _index(suite, work)
    openssl = _newest(stanzas, "openssl", suite)
    libssl_names = [name for name in _depends(stanzas, openssl)
                    if re.fullmatch(r"libssl\d[\w.+-]*", name)]
    if len(libssl_names) != 1:
        raise SuiteError(f"{suite}: openssl {openssl.version} depends on no single libssl "
                         f"package ({libssl_names})")
    libssl = _newest(stanzas, libssl_names[0], suite)
    if libssl.version != openssl.version:
        raise SuiteError(f"{suite}: {libssl.name} {libssl.version} is not openssl's "
                         f"version {openssl.version}")
    libc6 = _newest(stanzas, "libc6", suite)
    return {"openssl": openssl, libssl.name: libssl, "libc6": libc6}, signed


def _verified_text(inrelease: Path, output: Path) -> str:
    """The text that Debian's archive key signed (gpgv's output, never the raw file)."""
    result = subprocess.run(
        ["gpgv", "--keyring", str(KEYRING), "--status-fd", "1", "--output", str(output),
         str(inrelease)], capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0 or "[GNUPG:] VALIDSIG " not in result.stdout:
        raise SuiteError(f"gpgv does not accept {inrelease.name} against {KEYRING} "
                         f"(exit {result.returncode}):\n{result.stderr}")
    return output.read_text()


def _index_checksum(signed: str, suite: str) -> tuple[str, int]:
    section = re.search(r"^SHA256:\n((?: .*\n?)+)", signed, re.MULTILINE)
    for line in section[1].splitlines() if section else []:
        digest, size, name = line.split()
        if name == INDEX:
            return digest, int(size)
    raise SuiteError(f"{suite}: its signed InRelease names no SHA256 of {INDEX}")


def _stanzas(text: str) -> list[dict[str, str]]:
    stanzas = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            stanzas.append(fields)
    return stanzas


def _newest(stanzas: list[dict[str, str]], name: str, suite: str) -> Package:
    found = [s for s in stanzas
             if s["Package"] == name and s.get("Architecture") in ("amd64", "all")]
    if not found:
        raise SuiteError(f"{suite}: its {INDEX} lists no amd64 package {name}")
    best = found[0]
    for stanza in found[1:]:
        if subprocess.run(["dpkg", "--compare-versions", stanza["Version"], "gt",
                           best["Version"]]).returncode == 0:
            best = stanza
    return Package(name, best["Version"], best["Filename"], best["SHA256"], int(best["Size"]))


def _depends(stanzas: list[dict[str, str]], package: Package) -> list[str]:
    stanza = next(s for s in stanzas if s["Package"] == package.name
                  and s["Version"] == package.version)
    return [re.split(r"[\s(:]", alternative.strip())[0]
            for alternatives in stanza.get("Depends", "").split(",")
            for alternative in alternatives.split("|") if alternative.strip()]


def _download(path: str, destination: Path) -> None:
    url = f"{MIRROR}/{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, \
                destination.open("wb") as out:
            shutil.copyfileobj(response, out)
    except urllib.error.HTTPError as error:
        note = (" (Debian's pool sometimes lacks a file that the index lists)"
                if error.code == 404 and path.startswith("pool/") else "")
        raise SuiteError(f"GET {url}: HTTP {error.code} {error.reason}{note}") from error
    except (urllib.error.URLError, OSError) as error:
        raise SuiteError(f"GET {url}: {error}") from error


def _download_checked(path: str, destination: Path, sha256: str, size: int) -> None:
    _download(path, destination)
    digest = hashlib.sha256(destination.read_bytes()).hexdigest()
    got = destination.stat().st_size
    if digest != sha256 or got != size:
        raise SuiteError(f"{MIRROR}/{path}: SHA256 {digest} and {got} bytes, the signed index "
                         f"says {sha256} and {size} bytes")


def _check_runs(openssl: SuiteOpenssl, packages: dict[str, Package]) -> str:
    """Its `openssl version` runs through its loader and names its own libssl's release."""
    for path in (openssl.loader, openssl.root / "usr" / "bin" / "openssl", openssl.libssl):
        if not path.is_file() or path.is_symlink():
            raise SuiteError(f"{openssl.suite}: {path} is missing or a symlink after dpkg -x")
    text = _run(*openssl.command("version")).stdout.strip()
    upstream = re.sub(r"^\d+:", "", packages["openssl"].version).split("-")[0]
    if not text.startswith(f"OpenSSL {upstream} ") or (
            "Library:" in text and f"Library: OpenSSL {upstream} " not in text):
        raise SuiteError(f"{openssl.suite}: its openssl {packages['openssl'].version} says "
                         f"{text!r} through its own loader")
    return text.split(" (Library:")[0]


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_checked(*args, timeout=TIMEOUT_S, error=SuiteError)


if __name__ == "__main__":  # prepare the caches: python -m tests.support.debian_suites SUITE...
    import sys

    for name in sys.argv[1:]:
        ready = suite_openssl(name)
        print(name, ready.release, ready.packages, ready.libssl, sep="  ")
