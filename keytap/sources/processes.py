"""Who talked: the process behind a session's keys, named in a pcapng comment on the
session's first packet (Wireshark: `frame.comment`), the way ptcpdump annotates packets.

A key event carries the pid (tgid) it was read in and the command (comm) the kernel knew it by
at the handshake; the executable is read from /proc when the keys arrive (`note`), as close to
the handshake as keytap gets: a one-shot client (`openssl s_client`) may be gone even then, and
is named by pid and command. The TLS library and its version come from whoever probed the
slot.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from keytap.events import KeyEvent

MAX_PROCESSES = 4096
FRESH_NS = 1_000_000_000  # a name read this recently is not read again (pids are reused)


class Talkers:
    """Names the processes whose keys decrypt a session."""

    def __init__(self, library_of: Callable[[int], str]) -> None:
        """`library_of(slot)`: the TLS library and version that slot reads (tls.probes)."""
        self._library_of = library_of
        self._names: OrderedDict[int, str] = OrderedDict()  # pid -> "curl (/usr/bin/curl)"
        self._read_ns: dict[int, int] = {}  # pid -> when its name was read

    def note(self, keys: KeyEvent) -> None:
        """Keys just arrived: look at their process now, while it most likely still runs."""
        now = time.monotonic_ns()
        if now - self._read_ns.get(keys.pid, -FRESH_NS) < FRESH_NS:
            return  # the other layouts' reads of the same handshake, or its other side
        self._read_ns[keys.pid] = now
        name = _process_name(keys.pid, keys.command)
        if name is None:
            del self._read_ns[keys.pid]  # gone: nothing to keep
        else:
            self._names[keys.pid] = name
            self._names.move_to_end(keys.pid)
            while len(self._names) > MAX_PROCESSES:
                self._read_ns.pop(self._names.popitem(last=False)[0], None)

    def comment(self, keys: Iterable[KeyEvent]) -> str:
        """One line per distinct process and role: "TLS keys: client pid 123 curl
        (/usr/bin/curl), OpenSSL 3.0.22 (/usr/lib/x86_64-linux-gnu/libssl.so.3)"."""
        lines = []
        for ev in keys:
            name = self._names.get(ev.pid) or f"{ev.command} (exited before keytap looked)"
            line = (f"TLS keys: {'server' if ev.server else 'client'} pid {ev.pid} {name}, "
                    f"{self._library_of(ev.slot)}")
            if line not in lines:
                lines.append(line)
        return "\n".join(lines)


def _process_name(pid: int, command: str) -> str | None:
    """"COMMAND (EXECUTABLE)", or None if the process is gone."""
    try:
        executable = os.readlink(f"/proc/{pid}/exe")
    except OSError:  # gone, a zombie, or a kernel we may not look into
        return None
    return f"{command} ({executable})"
