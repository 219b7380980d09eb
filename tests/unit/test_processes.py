"""Who talked: the comment naming the processes whose keys decrypt a session."""

from __future__ import annotations

import os
import subprocess
import sys

from keytap.events import KeyEvent
from keytap.sources.processes import Talkers


def keys(pid: int, command: str, server: bool = False, slot: int = 3) -> KeyEvent:
    return KeyEvent(0, bytes(32), ("CLIENT_RANDOM 00 00",), slot, server=server, pid=pid,
                    command=command)


def test_a_running_process_is_named_with_its_executable_and_library() -> None:
    talkers = Talkers(lambda slot: f"OpenSSL 3.0.22 (slot {slot})")
    me = keys(os.getpid(), "pytest")
    talkers.note(me)
    assert talkers.comment([me, me]) == (
        f"TLS keys: client pid {os.getpid()} pytest ({os.path.realpath(sys.executable)}), "
        "OpenSSL 3.0.22 (slot 3)")


def test_one_that_exited_is_named_by_pid_and_the_kernels_command() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    talkers = Talkers(lambda slot: "Go 1.19.8 (/srv/app)")
    client, server = keys(gone.pid, "true"), keys(gone.pid, "true", server=True)
    talkers.note(client)
    assert talkers.comment([client, server]).splitlines() == [
        f"TLS keys: client pid {gone.pid} true (exited before keytap looked), Go 1.19.8 (/srv/app)",
        f"TLS keys: server pid {gone.pid} true (exited before keytap looked), Go 1.19.8 (/srv/app)"]
