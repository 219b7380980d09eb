"""Where keytap's data lives: `bpf/` (BPF C that BCC compiles at run time) and `offsets/`
(OpenSSL struct offsets). An installed keytap carries them inside the package (setup.py copies
them there); an editable install or a plain checkout reads the checkout's own."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """keytap/<name> when installed, else <checkout>/<name>."""
    packaged = PACKAGE / name
    return packaged if packaged.is_dir() else PACKAGE.parent / name
