"""When a capture file ends and what the next one is called: tcpdump's -C, -G and -W.

Pure policy (no I/O), so that the names and the ring are unit-tested; sink.capture_file does
the cutting. tcpdump's rules, as a tcpdump user expects them:
- `-C MB`: a file that has grown past MB millions of bytes ends before the next packet; the
  files are FILE, FILE1, FILE2... (with `-W N`: FILE0..FILE<N-1>, zero-padded to the width of
  N-1, then FILE0 again: a ring of N files).
- `-G SECONDS`: a file ends every SECONDS; FILE is a strftime pattern, expanded (local time)
  when the file starts; with -C too, the numbers start again in each period.
- `-W N` with -G: the capture stops after N periods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RotationRule:
    """The -C, -G and -W of one capture; `pattern` is the -w/-o file name."""

    pattern: str
    size_bytes: int | None = None
    seconds: float | None = None
    count: int | None = None


class Rotation:
    """Which file is being written, and which comes next."""

    def __init__(self, rule: RotationRule, now_s: float) -> None:
        """`now_s`: wall-clock seconds when the first file starts."""
        self.rule = rule
        self._period_start = now_s
        self._periods = 1  # -G periods started
        self._number = 0  # -C files within the period
        ring = rule.size_bytes is not None and rule.count is not None and rule.count > 1
        self._width = len(str(rule.count - 1)) if ring and rule.count else 0
        self.name = self._name()

    def _name(self) -> str:
        rule = self.rule
        base = (time.strftime(rule.pattern, time.localtime(self._period_start))
                if rule.seconds is not None else rule.pattern)
        if self._number == 0 and self._width == 0:
            return base
        return f"{base}{self._number:0{self._width}d}"

    def full(self, size: int) -> bool:
        """Whether a file of `size` bytes ends before the next packet (-C)."""
        return self.rule.size_bytes is not None and size > self.rule.size_bytes

    def expired(self, now_s: float) -> bool:
        """Whether the current -G period is over."""
        return self.rule.seconds is not None and now_s - self._period_start >= self.rule.seconds

    def advance(self, now_s: float) -> str | None:
        """Move to the next file, by time if the period is over, else by size; its name, or
        None when -W periods of -G are done (the capture stops)."""
        rule = self.rule
        if self.expired(now_s):
            if rule.count is not None and self._periods >= rule.count:
                return None
            self._periods += 1
            self._period_start = now_s
            self._number = 0
        else:
            self._number += 1
            if rule.count is not None:
                self._number %= rule.count
        self.name = self._name()
        return self.name
