"""tshark as the judge: small wrappers that return what tshark says about a capture."""

from __future__ import annotations

import subprocess
from pathlib import Path


def fields(capture: Path, *names: str, display_filter: str = "", extra: tuple[str, ...] = ()
           ) -> list[list[str]]:
    """One row per packet, one column per field (tshark -T fields)."""
    command = ["tshark", "-n", "-r", str(capture), "-T", "fields", "-E", "separator=\t", *extra]
    if display_filter:
        command += ["-Y", display_filter]
    for name in names:
        command += ["-e", name]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return [line.split("\t") for line in result.stdout.splitlines()]


def export_http_objects(capture: Path, directory: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """The HTTP bodies tshark reassembles (decrypting TLS with what the file itself carries)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tshark", "-n", "-r", str(capture), "-q", *extra,
                    "--export-objects", f"http,{directory}"],
                   capture_output=True, text=True, check=True)
    return sorted(directory.iterdir())
