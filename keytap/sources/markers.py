"""The marker source: datagrams on a unix socket become packets of a pseudo interface.

Each datagram is "<CLOCK_MONOTONIC ns> <text>" (the pytest plugin sends "start test_x" and the
like); the text becomes the packet and its comment, merged in time order with the capture.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from pathlib import Path

from keytap.errors import KeytapError
from keytap.events import MARKER_IFINDEX, Direction, PacketEvent

MARKER_SNAPLEN = 4096


class MarkerSource:
    """Owns the bound socket (mode 0600) and removes it on close."""

    def __init__(self, path: Path, on_marker: Callable[[PacketEvent], None]) -> None:
        if path.exists() and not path.is_socket():
            raise KeytapError(f"--marker-socket {path} exists and is not a socket: choose a "
                              "new path")
        self._path = path
        self._on_marker = on_marker
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._socket.bind(str(path))
            path.chmod(0o600)
        except OSError as error:
            self._socket.close()
            raise KeytapError(f"--marker-socket {path}: {error.strerror}") from None
        self._socket.setblocking(False)

    def poll(self) -> None:
        while True:
            try:
                datagram = self._socket.recv(MARKER_SNAPLEN)
            except BlockingIOError:
                return
            stamp, _, text = datagram.decode(errors="replace").partition(" ")
            if not stamp.isdigit():
                continue
            data = text.encode()
            self._on_marker(PacketEvent(int(stamp), MARKER_IFINDEX, Direction.UNKNOWN,
                                        len(data), data, comment=text))

    def close(self) -> None:
        self._socket.close()
        self._path.unlink(missing_ok=True)
