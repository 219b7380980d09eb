"""A minimal pcapng block reader for tests, independent of keytap's writer on purpose: it checks
the framing the spec demands (lengths, trailers) and hands out the blocks' bodies."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

BT_SHB, BT_IDB, BT_ISB, BT_EPB, BT_DSB = 0x0A0D0D0A, 1, 5, 6, 10
SECRETS_TLS_KEY_LOG = 0x544C534B  # "TLSK"


@dataclass
class Block:
    type: int
    body: bytes


def walk(raw: bytes) -> list[Block]:
    blocks, offset = [], 0
    while offset < len(raw):
        btype, length = struct.unpack_from("<II", raw, offset)
        assert length % 4 == 0 and length >= 12, f"bad length {length} at {offset}"
        (trailer,) = struct.unpack_from("<I", raw, offset + length - 4)
        assert trailer == length, f"trailing length {trailer} != {length} at {offset}"
        blocks.append(Block(btype, raw[offset + 8 : offset + length - 4]))
        offset += length
    assert offset == len(raw)
    return blocks


def dsb_lines(capture: Path) -> set[str]:
    """The key-log lines of every Decryption Secrets Block in a pcapng file."""
    lines: set[str] = set()
    for block in walk(capture.read_bytes()):
        if block.type == BT_DSB:
            secrets_type, size = struct.unpack_from("<II", block.body)
            assert secrets_type == SECRETS_TLS_KEY_LOG
            lines |= set(block.body[8 : 8 + size].decode().splitlines())
    return lines
