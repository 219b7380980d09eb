"""Issue 14: every bad value is one line and exit 2, found before anything is attached or
created; SIGHUP stops a capture like SIGTERM."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from keytap.cli import EXIT_BAD_INPUT, StopFlag, main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """keytap capture ARGS as the command line runs it: exit code and stderr."""
    try:
        code = main(["capture", *args])
    except SystemExit as exited:  # argparse's way out
        code = exited.code
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *words: str) -> None:
    assert code == EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keytap: "), err
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(
    "extra",
    [["--duration", "nan"], ["--duration", "inf"], ["--duration", "1e300"],
     ["--key-wait", "nan"], ["--key-wait", "inf"], ["--key-wait", "1e9"],
     ["-B", "99999999"], ["-c", "0"], ["--duration", "-1"]],
)
def test_bad_numbers_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                  extra: list[str]) -> None:
    output = tmp_path / "x.pcapng"
    assert_one_line(*run(capsys, "-o", str(output), *extra), extra[0])
    assert not output.exists()


@pytest.fixture
def bad_paths(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "dir").mkdir()
    (tmp_path / "plain").write_text("not a program\n")
    yield tmp_path


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["-o", ""], ["-o needs a file name"]),
        (["-o", "{t}/x", "--ssl-lib", "{t}/missing.so"], ["--ssl-lib", "no such file"]),
        (["-o", "{t}/x", "--ssl-lib", "{t}/dir"], ["--ssl-lib", "is a directory"]),
        (["-o", "{t}/x", "--summary-json", "{t}/nodir/s.json"], ["{t}/nodir/s.json"]),
        (["-o", "{t}/x", "--summary-json", "{t}/dir"], ["--summary-json", "is a directory"]),
        (["-o", "{t}/x", "--marker-socket", "{t}/nodir/m.sock"], ["--marker-socket", "nodir"]),
        (["-o", "{t}/x", "--keylog-file", "{t}/x"], ["-o and --keylog-file", "same file"]),
        (["-o", "{t}/x", "--keylog-file", "{t}/./x"], ["same file"]),
        (["-o", "{t}/x", "--keylog-file", "-"], ["--keylog-file needs a file name"]),
        (["-o", "{t}/x", "--offsets", "{t}/none.json"], ["--offsets", "no such file"]),
        (["-o", "{t}/x", "--", "{t}/plain"], ["not an executable file"]),
        (["-o", "{t}/x", "--", "{t}/absent"], ["no such file"]),
        (["-o", "{t}/x", "--", "no-such-command-keytap"], ["no such command"]),
    ],
)
def test_bad_paths_are_one_line(capsys: pytest.CaptureFixture[str], bad_paths: Path,
                                extra: list[str], words: list[str]) -> None:
    before = sorted(bad_paths.rglob("*"))
    code, err = run(capsys, *(arg.format(t=bad_paths) for arg in extra))
    assert_one_line(code, err, *(word.format(t=bad_paths) for word in words))
    assert sorted(bad_paths.rglob("*")) == before  # nothing created


def test_sighup_stops_like_sigterm() -> None:
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    flag = StopFlag()
    try:
        flag.install()
        assert not flag()
        os.kill(os.getpid(), signal.SIGHUP)
        assert flag() and flag.signal == signal.SIGHUP
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
