"""Measure what the launch gate (sources.launches) costs process starts, and how long it holds.

Not a test (timings vary by machine). Target: /bin/true starts at >= 0.9x the rate without a
gate. The gate watches "/" by default, so every process on the machine passes through it
while this runs (it never denies and lets everything through if this script dies).
Run as root: .venv/bin/python tools/bench_launches.py [--true 1000] [--python 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from keytap.sources.launches import GateStats, LaunchGate, OpenedFile
from keytap.tls.libraries import inspect_library

# Starts the command `count` times, one after the other, and prints the seconds it took. A
# separate process: keytap's own children are not held (see sources.launches), the pod's are.
DRIVER = """
import os, sys, time
count, argv = int(sys.argv[1]), sys.argv[2:]
start = time.perf_counter()
for _ in range(count):
    pid = os.posix_spawn(argv[0], argv, os.environ)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, argv
print(time.perf_counter() - start)
"""
OPENER = "import sys\nfor p in sys.argv[1:]: open(p, 'rb').close()"
PYTHON = "/usr/bin/python3"
LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


def starts(count: int, argv: list[str]) -> float:
    """Starts per second of `argv`."""
    done = subprocess.run([sys.executable, "-c", DRIVER, str(count), *argv],
                          capture_output=True, text=True, check=True)
    return count / float(done.stdout)


def describe(opened: OpenedFile) -> None:
    """What keytap would do first with a new file (attaching probes comes on top)."""
    inspect_library(opened.path, opened.name)


@contextmanager
def gate(root: Path, in_scope: bool, inspect: Callable[[OpenedFile], None]
         ) -> Iterator[LaunchGate | None]:
    with LaunchGate([root], inspect, lambda _pid: in_scope) as opened:
        yield opened


@contextmanager
def busy_gil() -> Iterator[None]:
    """A pure-Python loop in keytap's process, as its ring polling would be."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def held_waits(root: Path, files: int, inspect: Callable[[OpenedFile], None],
               load: bool) -> GateStats:
    """Open `files` new TLS libraries (copies of libssl) through a gate; its stats."""
    with tempfile.TemporaryDirectory(dir=root / "tmp" if root == Path("/") else root) as d:
        copies = []
        for index in range(files):
            copies.append(Path(d) / f"libssl-{index}.so.3")
            shutil.copy(LIBSSL, copies[-1])
        with gate(root, True, inspect) as opened, busy_gil() if load else nullcontext():
            subprocess.run([sys.executable, "-c", OPENER, *map(str, copies)], check=True)
            assert opened is not None
            return opened.stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--true", type=int, default=1000, help="starts of /bin/true")
    parser.add_argument("--python", type=int, default=50,
                        help=f"starts of {PYTHON} -c 'import ssl'")
    parser.add_argument("--new-files", type=int, default=50, help="new libssl copies opened")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--root", type=Path, default=Path("/"), help="file system to watch")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_launches: needs root (fanotify permission events)")
    workloads = {"/bin/true": (args.true, ["/bin/true"]),
                 "python3 -c 'import ssl'": (args.python, [PYTHON, "-c", "import ssl"])}
    modes: list[tuple[str, bool | None]] = [("no gate", None), ("gate, in scope", True),
                                            ("gate, out of scope", False)]
    rates: dict[str, dict[str, list[float]]] = {w: {} for w in workloads}
    stats: dict[str, GateStats] = {}
    for count, argv in workloads.values():
        starts(max(count // 10, 1), argv)  # warm the page cache: the first mode is not unlucky
    for round_ in range(args.rounds):  # interleaved, each a fresh gate: first opens included
        for mode, in_scope in (modes[::-1] if round_ % 2 else modes):
            context = (nullcontext(None) if in_scope is None
                       else gate(args.root, in_scope, describe))
            with context as opened:
                for name, (count, argv) in workloads.items():
                    rates[name].setdefault(mode, []).append(
                        starts(max(count // args.rounds, 1), argv))
                if opened is not None:
                    stats[mode] = opened.stats()
    print(f"{'workload':26s} {'mode':20s} {'starts/s':>9s} {'ratio':>6s}")
    for name, by_mode in rates.items():
        base = sum(by_mode["no gate"]) / len(by_mode["no gate"])
        for mode, values in by_mode.items():
            rate = sum(values) / len(values)
            print(f"{name:26s} {mode:20s} {rate:9.1f} {rate / base:6.2f}x")
    for mode, each in stats.items():  # the last round's gate
        print(f"{mode}: events {each.events}, ignored {each.ignored}, candidates "
              f"{each.candidates}, inspected {each.inspected}, out of scope {each.out_of_scope}, "
              f"fast p50/p99 {each.fast_p50_us:.0f}/{each.fast_p99_us:.0f} us, held p50/p99 "
              f"{each.held_p50_us:.0f}/{each.held_p99_us:.0f} us")
    print(f"\nheld waits for {args.new_files} new libssl files (read -> answer, microseconds):")
    for label, inspect, load in (("inspect does nothing", lambda _o: None, False),
                                 ("inspect does nothing, GIL busy", lambda _o: None, True),
                                 ("inspect_library", describe, False),
                                 ("inspect_library, GIL busy", describe, True)):
        each = held_waits(args.root, args.new_files, inspect, load)
        print(f"  {label:32s} p50 {each.held_p50_us:8.0f}  p99 {each.held_p99_us:8.0f}  max "
              f"{each.held_max_us:8.0f}  timeouts {each.timeouts}  {json.dumps(each.histogram)}")


if __name__ == "__main__":
    main()
