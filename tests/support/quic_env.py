"""An OpenSSL with QUIC, client and server API (3.5+), as a shared libssl the lab can dlopen.

Debian 12 has OpenSSL 3.0 (no QUIC), and the cryptography wheels link OpenSSL statically with
its QUIC functions as local symbols (not callable). psycopg-binary's wheel bundles the shared
libssl and libcrypto of OpenSSL 3.5 in `psycopg_binary.libs/`. It is installed once with pip
(--target, no dependencies: only those files are used) under ~/.cache/keytap-matrix beside the
matrix venvs, and reused by later runs; a failed install raises VenvError: the test fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

from keytap.tls.libraries import inspect_library
from tests.support.matrix_env import CACHE, cached, run_checked

PSYCOPG_BINARY = "3.3.0"
OPENSSL = "3.5.4"  # what that wheel bundles; offsets/openssl.json has its layout


def libssl() -> Path:
    """The wheel's libssl (its libcrypto beside it), installed on first use."""
    directory = CACHE / f"psycopg-binary-{PSYCOPG_BINARY}"

    def build() -> str:
        run_checked(sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                    "--no-deps", "--only-binary", ":all:", "--target", str(directory),
                    f"psycopg-binary=={PSYCOPG_BINARY}")
        library = inspect_library(_find(directory))  # the version as keytap reads it
        return f"OpenSSL {library and library.version} (bundled libssl, as keytap reads it)"

    cached(directory, build, f"psycopg-binary {PSYCOPG_BINARY}", OPENSSL)
    return _find(directory)


def _find(directory: Path) -> Path:
    (path,) = (directory / "psycopg_binary.libs").glob("libssl-*.so.3")
    return path
