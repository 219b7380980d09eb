"""Measure how many Enhanced Packet Blocks per second PcapngWriter writes to memory.

Not a test (timings vary by machine); keytap needs at least 200,000 EPB/s of 100-byte packets.
Run: .venv/bin/python tools/bench_pcapng.py [packets]
"""

from __future__ import annotations

import argparse
import io
import time

from keytap.events import Direction
from keytap.sink.pcapng import InterfaceDescription, PcapngWriter


def bench(count: int, direction: Direction) -> float:
    """EPBs per second for `count` 100-byte packets, best of three runs."""
    data = bytes(range(100))
    best = 0.0
    for _ in range(3):
        writer = PcapngWriter(
            io.BytesIO(), [InterfaceDescription("eth0", "bench", 262144)], application="bench"
        )
        write = writer.write_packet
        ts = 1_700_000_000_000_000_000
        start = time.perf_counter()
        for i in range(count):
            write(0, ts + i, data, 100, direction)
        best = max(best, count / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packets", type=int, nargs="?", default=500_000)
    count = parser.parse_args().packets
    for direction in (Direction.UNKNOWN, Direction.INBOUND):
        print(f"{direction.name:8s} {bench(count, direction):12,.0f} EPB/s")


if __name__ == "__main__":
    main()
