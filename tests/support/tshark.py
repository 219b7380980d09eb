"""tshark as the judge: small wrappers that return what tshark says about a capture."""

from __future__ import annotations

import subprocess
from pathlib import Path

# The lab's TLS servers listen on these ports. tshark picks a TCP stream's dissector by port,
# the lower one first, and has no TLS registration for them, so a client whose ephemeral port
# another protocol registered (34980 is EtherCAT's) made the whole stream EtherCAT to tshark,
# nothing of it TLS (a CI failure). Decode-as makes them TLS whatever the client's port.
TLS_PORTS = (4433, 4434, 4443, 8443)
DECODE_AS = tuple(arg for port in TLS_PORTS for arg in ("-d", f"tcp.port=={port},tls"))


def fields(capture: Path, *names: str, display_filter: str = "", extra: tuple[str, ...] = ()
           ) -> list[list[str]]:
    """One row per packet, one column per field (tshark -T fields)."""
    command = ["tshark", "-n", "-r", str(capture), "-T", "fields", "-E", "separator=\t",
               *DECODE_AS, *extra]
    if display_filter:
        command += ["-Y", display_filter]
    for name in names:
        command += ["-e", name]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return [line.split("\t") for line in result.stdout.splitlines()]


def export_http_objects(capture: Path, directory: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """The HTTP bodies tshark reassembles (decrypting TLS with what the file itself carries)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tshark", "-n", "-r", str(capture), "-q", *DECODE_AS, *extra,
                    "--export-objects", f"http,{directory}"],
                   capture_output=True, text=True, check=True)
    return sorted(directory.iterdir())


def follow_tls(capture: Path, streams: range, extra: tuple[str, ...] = ()) -> list[list[bytes]]:
    """Decrypted TLS payload of each TCP stream as tshark's follow shows it: per stream, the
    data of each direction concatenated (which side is which, tell by content). tshark prints
    the sections in an order of its own: each is matched to its stream by its filter line."""
    command = ["tshark", "-n", "-r", str(capture), "-q", *DECODE_AS, *extra]
    for stream in streams:
        command += ["-z", f"follow,tls,raw,{stream}"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    by_stream: dict[int, list[bytes]] = {}
    for section in output.split("Follow: tls,raw")[1:]:
        sides = [bytearray(), bytearray()]
        stream = None
        for line in section.splitlines():
            if line.startswith("Filter: tcp.stream eq "):
                stream = int(line.rsplit(" ", 1)[1])
            if line.startswith("=") or ":" in line or not line.strip():
                continue
            sides[line.startswith("\t")].extend(bytes.fromhex(line.strip()))
        assert stream is not None, f"a follow section without its filter line:\n{section}"
        by_stream[stream] = [bytes(side) for side in sides]
    return [by_stream[stream] for stream in streams]
