"""stats accounting, the capture command line, and the output file (mode 0600, early errors)."""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keytap.cli import build_parser
from keytap.errors import KeytapError
from keytap.events import Direction
from keytap.kernel.abi import MAX_SNAPLEN
from keytap.report import SUMMARY_TEXT, CaptureStats, InterfaceStats, gate_summary, summary_lines
from keytap.sink.files import STDOUT, check_output_path, open_output
from keytap.sources.launches import GateStats
from keytap.sources.packets import KernelCounters

# stats ---------------------------------------------------------------------------------------


def counters() -> dict[tuple[int, Direction], KernelCounters]:
    return {
        (3, Direction.INBOUND): KernelCounters(seen=100, dropped=4),
        (3, Direction.OUTBOUND): KernelCounters(seen=50, dropped=1),
        (9, Direction.INBOUND): KernelCounters(seen=1000, dropped=1000),  # not captured
    }


def test_update_kernel_accounts_every_packet() -> None:
    veth = InterfaceStats("kp1", 3, written=137, discarded=8, written_bytes=9000)
    veth.update_kernel(counters())

    assert (veth.seen_in, veth.seen_out, veth.kernel_dropped) == (100, 50, 5)
    assert veth.dropped == 5 + 8
    assert veth.seen == veth.written + veth.dropped == 150


def test_update_kernel_without_counters_is_zero() -> None:
    quiet = InterfaceStats("kp2", 4)
    quiet.update_kernel(counters())
    assert (quiet.seen, quiet.dropped, quiet.written) == (0, 0, 0)


def test_update_kernel_replaces_rather_than_adds() -> None:
    veth = InterfaceStats("kp1", 3, written=145)
    veth.update_kernel(counters())
    veth.update_kernel(counters())
    assert (veth.seen, veth.kernel_dropped) == (150, 5)


def test_summary_lines() -> None:
    first = InterfaceStats("kp1", 3, written=137, discarded=8, written_bytes=9000)
    second = InterfaceStats("kp2", 4, written=0)
    stats = CaptureStats([first, second], start_ns=1, end_ns=2)
    for interface in stats.interfaces:
        interface.update_kernel(counters())

    assert summary_lines(stats.as_dict()) == [
        "150 packets seen by the classifier, 137 written, 13 dropped",
        "  kp1: seen 150 (in 100, out 50), written 137, dropped 13 (kernel 5, after -c 8, "
        "output failed 0)",
        "  kp2: seen 0 (in 0, out 0), written 0, dropped 0 (kernel 0, after -c 0, "
        "output failed 0)",
    ]
    assert stats.status_line() == "137 packets written (0.0 MB), 13 dropped"
    assert stats.status_line((5, 4)) == ("137 packets written (0.0 MB), 13 dropped; "
                                         "TLS sessions 5, with keys 4")
    summary = stats.as_dict()
    assert summary["packets"] == {"seen": 150, "written": 137, "dropped": 13, "filtered": 0}
    assert summary["interfaces"][0]["seen"] == 150
    assert summary["interfaces"][0]["dropped"] == 13


def test_filtered_packets_add_up_and_are_shown() -> None:
    veth = InterfaceStats("kp1", 3, written=40)
    veth.update_kernel({(3, Direction.INBOUND): KernelCounters(seen=100, filtered=60),
                        (3, Direction.OUTBOUND): KernelCounters(seen=5, dropped=1, filtered=4)})
    assert veth.seen == veth.written + veth.dropped + veth.filtered == 105
    lines = summary_lines(CaptureStats([veth]).as_dict())
    assert lines[0] == ("105 packets seen by the classifier, 40 written, 1 dropped, "
                        "64 filtered out")
    assert " written 40, filtered 64, dropped 1 " in lines[1]


def test_launch_gate_line() -> None:
    gate = GateStats(events=900, candidates=4, held_p50_us=2100.0, held_p99_us=4800.0,
                     held_max_us=4800.0, timeouts=1)
    part = gate_summary(gate)
    assert part["held"] == 4 and part["held_p99_ms"] == 4.8
    assert SUMMARY_TEXT[2].format(**part) == (
        "launch gate: 900 opens checked, 4 held until their file was inspected (p50 2.1 ms, "
        "p99 4.8 ms, max 4.8 ms), 1 let go unanswered after the longest hold, 0 inspections "
        "failed")


# cli -----------------------------------------------------------------------------------------


def parse(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["capture", *args])


def rejects(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Parse, expect argparse's usage error, return its message."""
    with pytest.raises(SystemExit) as raised:
        parse(*args)
    assert raised.value.code == 2
    return capsys.readouterr().err


def test_defaults() -> None:
    args = parse("-i", "kp1", "-o", "out.pcapng")
    assert (args.interfaces, args.output) == (["kp1"], "out.pcapng")
    assert (args.count, args.duration) == (None, None)
    assert (args.snaplen, args.buffer_size) == (MAX_SNAPLEN, 64 * 1024)


def test_interface_is_repeatable() -> None:
    args = parse("-i", "kp1", "--interface", "kp2", "-i", "kp3", "-o", STDOUT)
    assert args.interfaces == ["kp1", "kp2", "kp3"]
    assert args.output == STDOUT


def test_options() -> None:
    args = parse("-i", "kp1", "-o", "x", "-c", "10", "--duration", "2.5", "-s", "96", "-B", "1024")
    assert (args.count, args.duration, args.snaplen, args.buffer_size) == (10, 2.5, 96, 1024)


def test_snaplen_zero_means_maximum() -> None:
    assert parse("-i", "kp1", "-o", "x", "-s", "0").snaplen == MAX_SNAPLEN == 262144
    assert parse("-i", "kp1", "-o", "x", "-s", "262144").snaplen == MAX_SNAPLEN


def test_snaplen_too_large_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    assert "snaplen must be 1..262144" in rejects(capsys, "-i", "kp1", "-o", "x", "-s", "300000")


@pytest.mark.parametrize(
    "extra",
    [["-c", "0"], ["-c", "-3"], ["-c", "many"], ["--duration", "0"], ["--duration", "-1"],
     ["-B", "0"], ["-s", "-1"]],
)
def test_bad_numbers_rejected(capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    assert rejects(capsys, "-i", "kp1", "-o", "x", *extra)


def test_output_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert "-o/-w/--output" in rejects(capsys, "-i", "kp1")


# output --------------------------------------------------------------------------------------


@pytest.fixture
def umask_zero() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_open_output_creates_0600_under_umask_zero(tmp_path: Path, umask_zero: None) -> None:
    path = tmp_path / "new.pcapng"
    with open_output(str(path)) as stream:
        stream.write(b"data")
    assert mode(path) == 0o600
    assert path.read_bytes() == b"data"


def test_open_output_replaces_existing_file(tmp_path: Path, umask_zero: None) -> None:
    path = tmp_path / "old.pcapng"
    path.write_bytes(b"previous capture, longer than the new one")
    path.chmod(0o644)
    with open_output(str(path)) as stream:
        stream.write(b"new")
    assert mode(path) == 0o600
    assert path.read_bytes() == b"new"


def test_open_output_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "out.pcapng"
    with pytest.raises(KeytapError) as raised:
        open_output(str(path))
    assert str(path) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_check_output_path_accepts_files_and_stdout(tmp_path: Path) -> None:
    check_output_path(STDOUT)
    check_output_path(str(tmp_path / "new.pcapng"))
    (tmp_path / "old.pcapng").write_bytes(b"")
    check_output_path(str(tmp_path / "old.pcapng"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pcapng"]  # nothing created


@pytest.mark.parametrize(
    ("make_path", "words"),
    [
        (lambda tmp: tmp / "no-such-dir" / "out.pcapng", "does not exist"),
        (lambda tmp: tmp / "a" / "b" / "out.pcapng", "does not exist"),
        (lambda tmp: tmp, "is a directory"),
    ],
)
def test_check_output_path_errors(
    tmp_path: Path, make_path: Callable[[Path], Path], words: str
) -> None:
    path = str(make_path(tmp_path))
    with pytest.raises(KeytapError) as raised:
        check_output_path(path)
    message = str(raised.value)
    assert path in message
    assert words in message
    assert "\n" not in message
