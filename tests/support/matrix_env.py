"""Virtual environments with one `cryptography` wheel each: OpenSSL releases, statically linked.

Each wheel carries its own OpenSSL. A venv per version is made once under
~/.cache/keytap-matrix/<version> (the system Python, no system site packages) and reused by
later runs; a `.ready` file, written last, says the install finished and was checked. A failed
install raises VenvError with pip's own message: the matrix test fails, it never skips.
The releases before 1.1.1 (LEGACY_WHEELS, for test_matrix_legacy.py) are cached the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import shutil
import ssl
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
CACHE = Path.home() / ".cache" / "keytap-matrix"

# cryptography wheel -> the OpenSSL release it links statically
WHEELS = {
    "3.4.8": "1.1.1l",
    "38.0.4": "3.0.7",
    "41.0.7": "3.1.4",
    "42.0.8": "3.2.2",
    "43.0.3": "3.3.2",
    "44.0.3": "3.4.1",
    "45.0.7": "3.5.2",
    "50.0.2": "4.0.3",
}
# One wheel for each other OpenSSL release the cryptography lines 36 to 51 link: tested only with
# their table entry removed (test_matrix.WITHOUT_ENTRY), so that the candidates are shown to find
# every release's layout, not only the eight above.
OTHER_WHEELS = {
    "36.0.2": "1.1.1n",
    "37.0.0": "3.0.2",
    "37.0.4": "3.0.5",
    "39.0.2": "3.0.8",
    "40.0.2": "3.1.0",
    "41.0.0": "3.1.1",
    "42.0.0": "3.2.0",
    "43.0.0": "3.3.1",
    "44.0.0": "3.4.0",
    "45.0.1": "3.5.0",
    "46.0.0": "3.5.3",
    "46.0.7": "3.5.6",
    "47.0.0": "4.0.0",
    "48.0.1": "4.0.1",
    "51.0.1": "4.1.1",
}
ALL_WHEELS = {**WHEELS, **OTHER_WHEELS}
# the system libssl3, as the Debian Python links it (e.g. "3.0.19")
SYSTEM_OPENSSL = ssl.OPENSSL_VERSION.split()[1]
# The cryptography of keytap's own venv: whatever release PyPI served at set-up, with an OpenSSL
# that may be newer than any table (4.1.1 on 2026-12-07). Not pinned on purpose: the real world.
NEWEST = "newest"
# OpenSSL releases before 1.1.1 (TLS 1.2 only, no keylog callback) -> the wheel carrying one.
# cryptography 2.4.2 links 1.1.0j statically and is abi3, so it installs on today's Python.
# psycopg2-binary 2.8 ships libssl and libcrypto 1.0.2r as shared objects, in wheels for
# Python 3.7 at most: unpacked, not installed, and its libssl is driven through cffi.
LEGACY_WHEELS = {"1.1.0j": "cryptography==2.4.2", "1.0.2r": "psycopg2-binary==2.8"}

VERSION_CHECK = ("from cryptography.hazmat.backends.openssl.backend import backend\n"
                 "print(backend.openssl_version_text())")
# the same for a libssl file (argv[1]) of OpenSSL 1.0.x, through cffi
SSLEAY_VERSION = ("import cffi, sys\nffi = cffi.FFI()\n"
                  "ffi.cdef('const char *SSLeay_version(int);')\n"
                  "print(ffi.string(ffi.dlopen(sys.argv[1]).SSLeay_version(0)).decode())")


class VenvError(Exception):
    """A matrix venv could not be made; the message carries the failing command's output."""


def run_checked(*args: str, timeout: float = 600,
                error: type[Exception] = VenvError) -> subprocess.CompletedProcess:
    """Run a command; `error` with its output if it fails or times out."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise error(f"{' '.join(args)} timed out after {timeout}s") from exc
    if result.returncode != 0:
        raise error(f"{' '.join(args)} exited with {result.returncode}:\n"
                                f"{result.stdout}\n{result.stderr}")
    return result


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Two test runs at once build a cache entry once: the second waits for the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def venv_python(version: str) -> Path:
    """The python of the venv holding cryptography==`version`, made on first use."""
    return _cryptography_venv(version, ALL_WHEELS[version])


def _cryptography_venv(version: str, openssl: str) -> Path:
    directory = CACHE / version
    python = directory / "bin" / "python"

    def build() -> str:
        run_checked(SYSTEM_PYTHON, "-m", "venv", str(directory))
        run_checked(str(python), "-m", "pip", "install", "--disable-pip-version-check",
                    "--only-binary", ":all:", f"cryptography=={version}", "cffi")
        return run_checked(str(python), "-c", VERSION_CHECK).stdout.strip()

    cached(directory, build, f"cryptography {version}", openssl)
    return python


def cached(directory: Path, build: Callable[[], str], what: str, openssl: str) -> None:
    """Run `build` unless an earlier run finished it; it returns the OpenSSL version text of
    what it made, which must name `openssl`."""
    ready, expected = directory / ".ready", f"OpenSSL {openssl} "
    with locked(directory.with_name(f"{directory.name}.lock")):
        if not ready.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a half-made one of an earlier run
            text = build()
            if not text.startswith(expected):
                raise VenvError(f"{what} links {text!r}, expected {expected.strip()}")
            ready.write_text(text + "\n")


@functools.cache
def newest_openssl() -> str:
    """The OpenSSL release the venv's own cryptography links (NEWEST)."""
    from cryptography.hazmat.backends.openssl.backend import backend
    return backend.openssl_version_text().split()[1]


def venv_directory(version: str) -> Path:
    """Where the venv of cryptography `version` is (NEWEST: keytap's own venv)."""
    return Path(sys.prefix) if version == NEWEST else CACHE / version


def static_library(version: str) -> Path:
    """The file of the venv that holds cryptography's OpenSSL (what keytap probes)."""
    bindings = next((venv_directory(version) / "lib").glob(
        "python3*/site-packages/cryptography/hazmat/bindings"))
    for name in ("_openssl.abi3.so", "_rust.abi3.so"):  # up to 40, OpenSSL is in _openssl
        if (bindings / name).exists():
            return bindings / name
    raise FileNotFoundError(f"no extension module with OpenSSL under {bindings}")


@dataclass(frozen=True)
class LegacyOpenssl:
    """How tests/lab/tls_legacy.py runs with one LEGACY_WHEELS release."""

    command: tuple[str, ...]  # the interpreter, with the environment it needs
    openssl: str  # tls_legacy.py --openssl: "cryptography", or the libssl file
    library: Path  # the file keytap must find and probe
    linkage: str  # as keytap reports it: "static" or "dynamic"


def legacy_openssl(release: str) -> LegacyOpenssl:
    """The wheel carrying OpenSSL `release` (LEGACY_WHEELS), made ready on first use."""
    package, version = LEGACY_WHEELS[release].split("==")
    if package == "cryptography":
        python = _cryptography_venv(version, release)
        return LegacyOpenssl((str(python),), "cryptography", static_library(version), "static")
    libssl = _unpacked_libssl(release)
    return LegacyOpenssl(("env", f"LD_LIBRARY_PATH={libssl.parent}", sys.executable),
                         str(libssl), libssl, "dynamic")


def _unpacked_libssl(release: str) -> Path:
    """The shared libssl of a wheel that has none for today's Python: the wheel is downloaded
    for Python 3.7 and its bundled libraries (auditwheel's .libs directory) are extracted
    together, so that LD_LIBRARY_PATH on that directory loads libssl with its libcrypto."""
    requirement = LEGACY_WHEELS[release]
    directory = CACHE / requirement.replace("==", "-")
    libs = directory / "libs"

    def build() -> str:
        run_checked(sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                    "--no-deps", "--only-binary", ":all:", "--platform", "manylinux1_x86_64",
                    "--python-version", "3.7", "--dest", str(directory / "wheel"), requirement)
        libs.mkdir()
        with zipfile.ZipFile(next((directory / "wheel").glob("*.whl"))) as wheel:
            for member in wheel.namelist():
                if Path(member).parent.name.endswith(".libs"):
                    (libs / Path(member).name).write_bytes(wheel.read(member))
        return run_checked("env", f"LD_LIBRARY_PATH={libs}", sys.executable, "-c",
                           SSLEAY_VERSION, str(_libssl_in(libs))).stdout.strip()

    cached(directory, build, requirement, release)
    return _libssl_in(libs)


def _libssl_in(libs: Path) -> Path:
    found = sorted(libs.glob("libssl*.so*"))
    if len(found) != 1:
        raise VenvError(f"expected one libssl in {libs}, found {[p.name for p in found]}")
    return found[0]
