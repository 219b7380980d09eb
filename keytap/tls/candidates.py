"""Candidate layouts for an OpenSSL build with no exact table entry, most likely first.

Two sources, in this order: the table's layouts that agree with every offset the build's own
machine code shows (tls.accessors), then the nearest table layout adjusted to those offsets
(a layout no release in the table has, such as a release whose only change was one member),
then the other table layouts by closeness (OffsetTable.candidates). None of them is trusted:
tls.selfcheck lets a candidate's keys through only once the wire proves it. Layouts that differ
only in what the kernel does not read (`ssl_size`...) read the same bytes: only the first of them
takes one of the few places read at once (abi.CANDIDATES).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from keytap.kernel.abi import LAYOUT_FIELDS
from keytap.tls.accessors import EXTRA_FIELDS, derive_offsets, mismatches
from keytap.tls.offsets import Layout, OffsetTable

# The TLS 1.3 arrays, back to back in every release that has them: placed together.
TLS13_ARRAYS = (
    "early_secret", "handshake_secret", "master_secret", "resumption_master_secret",
    "client_finished_secret", "server_finished_secret", "server_finished_hash",
    "handshake_traffic_hash", "client_app_traffic_secret", "server_app_traffic_secret",
    "exporter_master_secret", "early_exporter_master_secret",
)
ANCHOR = "early_exporter_master_secret"


def candidate_layouts(table: OffsetTable, version: str, path: Path) -> list[tuple[str, Layout]]:
    read_alike: dict[tuple[int | bool | None, ...], tuple[str, Layout]] = {}
    for label, layout in _ordered(table, version, path):
        read_alike.setdefault(tuple(getattr(layout, name) for name in LAYOUT_FIELDS),
                              (label, layout))
    return list(read_alike.values())


def _ordered(table: OffsetTable, version: str, path: Path) -> list[tuple[str, Layout]]:
    """Most likely first, repeats included (candidate_layouts keeps the first of each)."""
    nearest = table.candidates(version)
    try:
        derived = derive_offsets(path)
    except (OSError, ValueError):
        derived = {}
    if not derived or not nearest:
        return [(f"the layout of {release}", layout) for release, layout in nearest]
    agreeing = [(release, layout) for release, layout in nearest
                if not mismatches(derived, layout)]
    others = [(release, layout) for release, layout in nearest
              if (release, layout) not in agreeing]
    release, base = nearest[0]
    return [*((f"the layout of {release}", layout) for release, layout in agreeing),
            (f"the layout of {release} adjusted to the build's machine code",
             adjust(base, derived)),
            *((f"the layout of {release}", layout) for release, layout in others)]


def adjust(base: Layout, derived: dict[str, int | bool]) -> Layout:
    """`base` with the offsets the machine code shows; the TLS 1.3 arrays moved with their
    anchor (the one of them an exported function reaches) when it moved."""
    changes: dict[str, int | bool] = {name: value for name, value in derived.items()
                                      if name not in EXTRA_FIELDS and hasattr(base, name)}
    s3 = int(changes.get("s3", base.s3))
    is_pointer = bool(changes.get("s3_is_pointer", base.s3_is_pointer))
    if not is_pointer:
        for extra, member in zip(EXTRA_FIELDS, ("s3_client_random", "s3_server_random"),
                                 strict=True):
            if extra in derived and member not in derived:
                changes[member] = int(derived[extra]) - s3
    anchor = getattr(base, ANCHOR)
    if anchor is not None and ANCHOR in derived:
        shift = int(derived[ANCHOR]) - anchor
        for name in TLS13_ARRAYS:
            value = getattr(base, name)
            if value is not None and name not in derived:
                changes[name] = value + shift
    return dataclasses.replace(base, **changes)
