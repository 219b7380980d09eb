"""Issue 6: `keytap libs` lists what a capture would instrument, and whether offsets exist."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from keytap.demo.labnet import Lab
from keytap.tls.offsets import OffsetTable
from tests.support import matrix_env
from tests.support.matrix_env import SYSTEM_OPENSSL
from tests.support.runner import keytap_command


def libs(lab: Lab, *args: str) -> dict[str, list[str]]:
    """keytap libs' table: library path -> [version, found as, offsets, pids]."""
    lines = lab.run(lab.node, *keytap_command("libs", *args)).stdout.splitlines()
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]
    return {row[0]: row[1:] for row in rows}


IMPORT_BINDING = ("import time\n"
                  "from cryptography.hazmat.bindings.openssl.binding import Binding\n"
                  "time.sleep(60)")


def wait_for_mapping(pid: int, name: str) -> None:
    """Until the process has loaded the library (python imports take a moment)."""
    deadline = time.monotonic() + 30
    while name not in Path(f"/proc/{pid}/maps").read_text():
        assert time.monotonic() < deadline, f"{pid} never mapped {name}"
        time.sleep(0.05)


def test_lists_the_pods_libraries_with_version_and_offsets(lab: Lab) -> None:
    dynamic = lab.spawn(lab.pod, "/usr/bin/python3", "-c", "import ssl, time; time.sleep(60)")
    # cryptography 50.0.2 links OpenSSL 4.0.3, in the table by build id only; keytap's own venv
    # has whatever PyPI served, which the table may not know
    static = lab.spawn(lab.pod, str(matrix_env.venv_python("50.0.2")), "-c", IMPORT_BINDING)
    newest = lab.spawn(lab.pod, sys.executable, "-c", IMPORT_BINDING)
    outside = lab.spawn(lab.client, "/usr/bin/python3", "-c", "import ssl, time; time.sleep(60)")
    for pid, name in ((dynamic.pid, "libssl.so.3"), (static.pid, "_rust.abi3.so"),
                      (newest.pid, "_rust.abi3.so"), (outside.pid, "libssl.so.3")):
        wait_for_mapping(pid, name)

    table = libs(lab, "-i", lab.pod_veth)
    libssl = next(row for path, row in table.items() if path.endswith("libssl.so.3"))
    in_table = OffsetTable.load().lookup(SYSTEM_OPENSSL) is not None
    assert libssl[:2] == [SYSTEM_OPENSSL, "dynamic"]
    assert libssl[2] == "yes (version)" if in_table else libssl[2].startswith("candidates: ")
    assert str(dynamic.pid) in libssl[3].split(",")
    pinned = table[str(matrix_env.static_library("50.0.2"))]
    assert pinned == ["4.0.3", "static", "yes (build id)", str(static.pid)]
    own = table[str(matrix_env.static_library(matrix_env.NEWEST))]
    assert own[:2] == [matrix_env.newest_openssl(), "static"]
    assert own[2].startswith(("yes (", "candidates: ")), own  # never "unknown"
    assert own[3] == str(newest.pid)
    assert all(str(outside.pid) not in row[3].split(",") for row in table.values())

    only = libs(lab, "--pid", str(outside.pid))
    assert [row[3] for row in only.values()] == [str(outside.pid)]
