"""Virtual environments with one `cryptography` wheel each: OpenSSL releases, statically linked.

Each wheel carries its own OpenSSL. A venv per version is made once under
~/.cache/keytap-matrix/<version> (the system Python, no system site packages) and reused by
later runs; a `.ready` file, written last, says the install finished and was checked. A failed
install raises VenvError with pip's own message: the matrix test fails, it never skips.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import ssl
import subprocess
from collections.abc import Iterator
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
# the system libssl3, as the Debian Python links it (e.g. "3.0.19")
SYSTEM_OPENSSL = ssl.OPENSSL_VERSION.split()[1]

VERSION_CHECK = ("from cryptography.hazmat.backends.openssl.backend import backend\n"
                 "print(backend.openssl_version_text())")


class VenvError(Exception):
    """A matrix venv could not be made; the message carries the failing command's output."""


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise VenvError(f"{' '.join(args)} timed out after {timeout}s") from exc
    if result.returncode != 0:
        raise VenvError(f"{' '.join(args)} exited with {result.returncode}:\n"
                                f"{result.stdout}\n{result.stderr}")
    return result


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Two test runs at once build a venv once: the second waits for the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def venv_python(version: str) -> Path:
    """The python of the venv holding cryptography==`version`, made on first use."""
    directory = CACHE / version
    python, ready = directory / "bin" / "python", directory / ".ready"
    expected = f"OpenSSL {WHEELS[version]} "
    with _locked(CACHE / f"{version}.lock"):
        if not ready.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a half-made venv of an earlier run
            _run(SYSTEM_PYTHON, "-m", "venv", str(directory))
            _run(str(python), "-m", "pip", "install", "--disable-pip-version-check",
                 "--only-binary", ":all:", f"cryptography=={version}", "cffi")
            text = _run(str(python), "-c", VERSION_CHECK).stdout.strip()
            if not text.startswith(expected):
                raise VenvError(f"cryptography {version} links {text!r}, "
                                        f"expected {expected.strip()}")
            ready.write_text(text + "\n")
    return python


def static_library(version: str) -> Path:
    """The file of the venv that holds cryptography's OpenSSL (what keytap probes)."""
    bindings = next((CACHE / version / "lib").glob("python3*/site-packages/cryptography/"
                                                   "hazmat/bindings"))
    for name in ("_openssl.abi3.so", "_rust.abi3.so"):  # up to 40, OpenSSL is in _openssl
        if (bindings / name).exists():
            return bindings / name
    raise FileNotFoundError(f"no extension module with OpenSSL under {bindings}")
