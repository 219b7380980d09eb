"""sources.launches: a task opening a new TLS file waits for inspect(), and for nothing else.

Every gate here watches tmpfs mounts of the test's own (never "/"), so concurrent tests and the
rest of the machine are not held. The child processes record when their open()/execve()
returned on CLOCK_MONOTONIC, the clock inspect() records on too.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keytap.errors import KeytapError
from keytap.sources.launches import LaunchGate, OpenedFile
from keytap.tls.libraries import inspect_library

HOLD_S = 0.05
LIBSSL = sorted(glob.glob("/usr/lib/*/libssl.so.3"))
LIBCRYPTO = sorted(glob.glob("/usr/lib/*/libcrypto.so.3"))

# argv: exit code, then paths to open; prints when each open started and returned.
OPENER = textwrap.dedent("""
    import json, signal, sys, time
    seen = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda n, _f: seen.append([signal.Signals(n).name, time.monotonic_ns()]))
    opens = []
    for path in sys.argv[2:]:
        start = time.monotonic_ns()
        with open(path, "rb"):
            opens.append([start, time.monotonic_ns()])
    print(json.dumps({"opens": opens, "signals": seen}), flush=True)
    sys.exit(int(sys.argv[1]))
""")


@dataclass
class Call:
    pid: int
    name: str
    head: bytes
    start_ns: int
    end_ns: int


class Recorder:
    """An inspect() that records its calls and holds each for `delay` seconds (or until
    `release` is set, when given)."""

    def __init__(self, delay: float = HOLD_S, release: threading.Event | None = None) -> None:
        self.calls: list[Call] = []
        self.delay = delay
        self.release = release
        self.started = threading.Event()

    def __call__(self, opened: OpenedFile) -> None:
        start = time.monotonic_ns()
        head = os.pread(opened.fd, 4, 0)
        self.started.set()
        if self.release is not None:
            self.release.wait()
        else:
            time.sleep(self.delay)
        self.calls.append(Call(opened.pid, opened.name, head, start, time.monotonic_ns()))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """mount("name") -> a fresh tmpfs of the test's own; all unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", f"keytap-test-{name}", str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def gates() -> Iterator[Callable[..., LaunchGate]]:
    made: list[LaunchGate] = []

    def make(*args: object, **kwargs: object) -> LaunchGate:
        gate = LaunchGate(*args, **kwargs)  # type: ignore[arg-type]
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.close()


def tls_file(where: Path, name: str = "libssl.so.3") -> Path:
    assert LIBSSL, "no system libssl.so.3 to copy: run tools/setup"
    target = where / name
    shutil.copy(LIBSSL[0], target)
    return target


def run_opener(*paths: Path, code: int = 0, timeout: float = 30) -> dict[str, list[list[int]]]:
    done = subprocess.run([sys.executable, "-c", OPENER, str(code), *map(str, paths)],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == code, done.stderr
    return json.loads(done.stdout)


def took(span: list[int]) -> float:
    return (span[1] - span[0]) / 1e9


def test_first_open_of_a_new_tls_file_waits_for_inspect_and_later_ones_do_not(
        tmpfs: Callable[[str], Path], gates: Callable[..., LaunchGate]) -> None:
    fs = tmpfs("fs")
    library = tls_file(fs)
    record = Recorder()
    gate = gates([fs], record, lambda _pid: True)

    first = run_opener(library, library)["opens"]
    again = run_opener(library)["opens"]

    assert len(record.calls) == 1, record.calls
    call = record.calls[0]
    assert call.head == b"\x7fELF" and call.name.endswith("/libssl.so.3")
    assert call.end_ns <= first[0][1], "open() returned before inspect() did"
    assert took(first[0]) >= HOLD_S
    assert took(first[1]) < HOLD_S / 2 and took(again[0]) < HOLD_S / 2, (first, again)
    stats = gate.stats()
    assert stats.inspected == 1 and stats.candidates == 1 and stats.timeouts == 0
    assert stats.held_p99_us >= HOLD_S * 1e6


def test_exec_of_a_binary_with_openssl_inside_waits_and_keeps_its_exit_code(
        tmpfs: Callable[[str], Path], gates: Callable[..., LaunchGate], tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "this test builds a small executable: install gcc (tools/setup)"
    fs = tmpfs("fs")
    source = tmp_path / "static.c"
    source.write_text("int SSL_do_handshake(void *s) { return s != 0; }\n"
                      "int main(void) { return 3 + SSL_do_handshake(0); }\n")
    binary = fs / "static-tls"
    subprocess.run([compiler, "-O0", "-o", str(binary), str(source)], check=True)
    record = Recorder()
    gate = gates([fs], record, lambda _pid: True)

    spans = []
    for _ in range(2):  # through sh, which forks: our own subprocess would vfork (below)
        start = time.monotonic_ns()
        assert subprocess.run(["/bin/sh", "-c", f"{binary}; exit $?"]).returncode == 3
        spans.append([start, time.monotonic_ns()])

    assert len(record.calls) == 1 and record.calls[0].name == str(binary)
    assert record.calls[0].end_ns <= spans[0][1]
    assert took(spans[0]) >= HOLD_S and took(spans[1]) < HOLD_S / 2, spans

    # CPython's subprocess vforks with the GIL held: holding that exec for keytap's threads
    # would wait for max_hold. Such an exec (it shares keytap's memory) is let through.
    other = fs / "static-tls-2"
    shutil.copy(binary, other)
    start = time.monotonic()
    assert subprocess.run([str(other)], timeout=30).returncode == 3
    assert time.monotonic() - start < 0.5
    assert len(record.calls) == 1 and gate.stats().timeouts == 0


def test_files_without_tls_are_never_inspected_and_cost_one_event_each(
        tmpfs: Callable[[str], Path], gates: Callable[..., LaunchGate]) -> None:
    fs = tmpfs("fs")
    text = fs / "notes.txt"
    text.write_text("not an ELF file\n")
    script = fs / "script.sh"
    script.write_text("#!/bin/sh\nexit 4\n")
    script.chmod(0o755)
    true = fs / "true"
    shutil.copy("/bin/true", true)
    record = Recorder()
    gate = gates([fs], record, lambda _pid: True)

    run_opener(text, script, true)
    assert subprocess.run([str(script)]).returncode == 4
    assert subprocess.run([str(true)]).returncode == 0
    first = gate.stats()
    run_opener(text, script, true)
    assert subprocess.run([str(true)]).returncode == 0
    second = gate.stats()

    assert record.calls == []
    assert first.not_elf >= 2 and first.no_tls >= 1 and first.candidates == 0
    assert second.events == first.events, "ignore marks did not stop the events"


def test_out_of_scope_opens_are_allowed_without_a_mark(
        tmpfs: Callable[[str], Path], gates: Callable[..., LaunchGate]) -> None:
    fs = tmpfs("fs")
    library = tls_file(fs)
    scope = {"in": False}
    record = Recorder()
    gate = gates([fs], record, lambda _pid: scope["in"])

    outside = run_opener(library)["opens"]
    assert record.calls == [] and took(outside[0]) < HOLD_S / 2
    scope["in"] = True
    inside = run_opener(library)["opens"]

    assert len(record.calls) == 1, "an out-of-scope open must not hide the file"
    assert took(inside[0]) >= HOLD_S
    assert gate.stats().out_of_scope == 1


def test_a_file_filled_after_its_first_open_is_classified_again(
        tmpfs: Callable[[str], Path], gates: Callable[..., LaunchGate]) -> None:
    """pip and the like create a file, then write it: the early verdict must not stick."""
    fs = tmpfs("fs")
    library = fs / "libssl.so.3"
    record = Recorder()
    gates([fs], record, lambda _pid: True)
    subprocess.run(["sh", "-c", f": > {library}; cat {library}"], check=True)  # empty: not ELF
    subprocess.run(["sh", "-c", f"cat {LIBSSL[0]} >> {library}"], check=True)

    run_opener(library)

    assert len(record.calls) == 1


def test_inspect_may_open_by_path_and_keytap_may_dlopen_from_a_watched_fs(
        tmpfs: Callable[[str], Path], gates: Callable[..., LaunchGate]) -> None:
    """The deadlocks of an in-process listener: inspect() opening files, and any keytap thread
    that opens while holding the GIL (ctypes.CDLL, importing an extension module)."""
    fs = tmpfs("fs")
    library = tls_file(fs)
    shutil.copy(LIBCRYPTO[0], fs / "libcrypto.so.3")
    found: list[str | None] = []

    def inspect(opened: OpenedFile) -> None:
        described = inspect_library(opened.path, opened.name,
                                    resolve_needed=lambda _n: (fs / "libcrypto.so.3", "x"))
        found.append(described.version if described else None)

    gate = gates([fs], inspect, lambda _pid: True)
    run_opener(library)
    assert found and found[0], found

    loaded = tls_file(fs, "libssl-for-keytap.so.3")
    worker = threading.Thread(target=lambda: ctypes.CDLL(str(loaded)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "keytap's own dlopen waited for the gate"
    assert gate.stats().own >= 2


def test_sigkilled_gate_leaves_the_held_task_to_finish_normally(
        tmpfs: Callable[[str], Path], tmp_path: Path) -> None:
    fs = tmpfs("fs")
    library = tls_file(fs)
    keytap = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, threading
        from pathlib import Path
        from keytap.sources.launches import LaunchGate
        def inspect(opened):
            print("inspecting", flush=True)
            threading.Event().wait()
        gate = LaunchGate([Path({str(fs)!r})], inspect, lambda pid: True, max_hold=600)
        print("ready", flush=True)
        threading.Event().wait()
    """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert keytap.stdout is not None
        assert keytap.stdout.readline().strip() == "ready"
        opener = subprocess.Popen([sys.executable, "-c", OPENER, "7", str(library)],
                                  stdout=subprocess.PIPE, text=True)
        assert keytap.stdout.readline().strip() == "inspecting"
        time.sleep(0.2)
        assert opener.poll() is None, "the opener did not wait"
        keytap.kill()
        killed = time.monotonic()
        out, _ = opener.communicate(timeout=10)
    finally:
        keytap.kill()
        keytap.wait()
    assert opener.returncode == 7
    assert time.monotonic() - killed < 5
    assert len(json.loads(out)["opens"]) == 1


def test_keytap_not_answering_in_time_lets_the_task_go(
        tmpfs: Callable[[str], Path], gates: Callable[..., LaunchGate]) -> None:
    fs = tmpfs("fs")
    library = tls_file(fs)
    release = threading.Event()
    gate = gates([fs], Recorder(release=release), lambda _pid: True, max_hold=0.3)
    try:
        opens = run_opener(library)["opens"]
    finally:
        release.set()
    assert 0.3 <= took(opens[0]) < 2
    assert gate.stats().timeouts == 1


def test_signals_reach_a_held_task_after_its_open_and_sigkill_at_once(
        tmpfs: Callable[[str], Path], gates: Callable[..., LaunchGate]) -> None:
    fs = tmpfs("fs")
    first, second = tls_file(fs, "a.so"), tls_file(fs, "b.so")
    record = Recorder(delay=1.0)
    # The hold must end when inspect() does, not at the gate's own limit (1 s by default, as
    # long as the delay: the open could go first, and its signals before inspect()'s end).
    gates([fs], record, lambda _pid: True, max_hold=5.0)

    opener = subprocess.Popen([sys.executable, "-c", OPENER, "5", str(first)],
                              stdout=subprocess.PIPE, text=True)
    assert record.started.wait(10)
    state = Path(f"/proc/{opener.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    opener.send_signal(signal.SIGINT)
    opener.send_signal(signal.SIGTERM)
    out, _ = opener.communicate(timeout=10)
    result = json.loads(out)
    assert opener.returncode == 5 and state == "D"
    assert [name for name, _ in result["signals"]] == ["SIGINT", "SIGTERM"]
    assert took(result["opens"][0]) >= 1.0, "a signal ended the wait early"
    assert all(at >= record.calls[0].end_ns for _, at in result["signals"])

    record.started.clear()
    victim = subprocess.Popen([sys.executable, "-c", OPENER, "0", str(second)])
    assert record.started.wait(10)
    victim.kill()
    killed = time.monotonic()
    assert victim.wait(timeout=5) == -signal.SIGKILL
    assert time.monotonic() - killed < 0.5


def mount_overlay(lower: Path, upper: Path, merged: Path) -> Path:
    """An overlay of `lower` at `merged`, its upper and work dirs in `upper`."""
    (upper / "up").mkdir()
    (upper / "work").mkdir()
    merged.mkdir()
    subprocess.run(["mount", "-t", "overlay", "keytap-test-overlay", "-o",
                    f"lowerdir={lower},upperdir={upper}/up,workdir={upper}/work", str(merged)],
                   check=True)
    return merged


def test_an_overlay_root_is_watched_through_its_layers(
        tmpfs: Callable[[str], Path], gates: Callable[..., LaunchGate], tmp_path: Path) -> None:
    """Marking an overlay and its lower file system deadlocks a lone reader inside read():
    add_root() marks the layers, and the second reader survives even the forced case."""
    lower, upper = tmpfs("lower"), tmpfs("upper")
    tls_file(lower)
    merged = mount_overlay(lower, upper, tmp_path / "merged")
    try:
        record = Recorder()
        gate = gates([], record, lambda _pid: True)
        assert gate._mark(merged) == errno.EXDEV  # never an overlay itself
        gate.add_root(merged)
        opened = run_opener(merged / "libssl.so.3", timeout=20)["opens"]
        assert len(record.calls) == 1 and record.calls[0].end_ns <= opened[0][1]

        forced = gates([lower], Recorder(delay=0), lambda _pid: True)
        assert forced._mark(merged, stacked=True) == 0
        tls_file(lower, "other.so")
        run_opener(merged / "other.so", merged / "libssl.so.3", timeout=20)
        assert forced.stats().own >= 1, "the nested event of the listener itself"
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)


def test_a_root_whose_layers_this_namespace_lacks_is_one_line_and_the_gate_goes_on(
        tmpfs: Callable[[str], Path], gates: Callable[..., LaunchGate], tmp_path: Path) -> None:
    """keytap in a container sees a pod's overlay root, not the host paths of its layers."""
    lower, upper = tmpfs("lower"), tmpfs("upper")
    merged = mount_overlay(lower, upper, tmp_path / "merged")
    try:
        subprocess.run(["umount", "-l", str(lower)], check=True)  # the layer lives on, unseen
        lower.rmdir()
        gate = gates([], Recorder(), lambda _pid: True)
        with pytest.raises(KeytapError, match=f"launch gate: cannot watch {merged}: overlay layer"):
            gate.add_root(merged)
        assert gate.alive
        gate.add_root(tmpfs("other"))  # and it still watches what it can
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)
