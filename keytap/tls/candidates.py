"""Candidate layouts for an OpenSSL build with no exact table entry, most likely first.

Two sources, in this order: the table's layouts that agree with every offset the build's own
machine code shows (tls.accessors), then the nearest table layout adjusted to those offsets
(a layout no release in the table has, such as a release whose only change was one member),
then the other table layouts by closeness (OffsetTable.candidates). None of them is trusted:
tls.selfcheck lets a candidate's keys through only once the wire proves it. Layouts that differ
only in what the kernel does not read (`ssl_size`...) read the same bytes: only the first of them
takes one of the few places read at once (abi.CANDIDATES).

A build whose version has a table entry that its machine code contradicts (a vendored or
patched copy under an upstream version number, such as quictls's QUIC members in Node.js's
OpenSSL) is such a build too: see `machine_code_offsets` and `mismatches`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from pathlib import Path

from keytap.kernel.abi import LAYOUT_FIELDS
from keytap.tls.accessors import EXTRA_FIELDS, derive_offsets, mismatches
from keytap.tls.offsets import Layout, OffsetTable

__all__ = ["candidate_layouts", "machine_code_offsets", "mismatches"]

# The TLS 1.3 arrays, back to back in every release that has them: placed together.
TLS13_ARRAYS = (
    "early_secret", "handshake_secret", "master_secret", "resumption_master_secret",
    "client_finished_secret", "server_finished_secret", "server_finished_hash",
    "handshake_traffic_hash", "client_app_traffic_secret", "server_app_traffic_secret",
    "exporter_master_secret", "early_exporter_master_secret",
)
MAX_ADJUSTED = 16  # adjusted layouts formed at most (each place the arrays may have moved at)

Derived = Mapping[str, int | bool]


def machine_code_offsets(path: Path) -> dict[str, int | bool]:
    """What the build's machine code shows (tls.accessors), or nothing if it cannot be read."""
    try:
        return derive_offsets(path)
    except (OSError, ValueError):
        return {}


def candidate_layouts(table: OffsetTable, version: str,
                      derived: Derived) -> list[tuple[str, Layout]]:
    """`derived`: the build's machine_code_offsets."""
    read_alike: dict[tuple[int | bool | None, ...], tuple[str, Layout]] = {}
    for label, layout in _ordered(table, version, derived):
        read_alike.setdefault(tuple(getattr(layout, name) for name in LAYOUT_FIELDS),
                              (label, layout))
    return list(read_alike.values())


def _ordered(table: OffsetTable, version: str, derived: Derived) -> list[tuple[str, Layout]]:
    """Most likely first, repeats included (candidate_layouts keeps the first of each)."""
    nearest = table.candidates(version)
    if not derived or not nearest:
        return [(f"the layout of {release}", layout) for release, layout in nearest]
    agreeing = [(release, layout) for release, layout in nearest
                if not mismatches(derived, layout)]
    others = [(release, layout) for release, layout in nearest
              if (release, layout) not in agreeing]
    release, base = nearest[0]
    label = f"the layout of {release} adjusted to the build's machine code"
    adjusted = adjust(base, derived)
    return [*((f"the layout of {release}", layout) for release, layout in agreeing),
            *((label + (f" ({moved})" if len(adjusted) > 1 else ""), layout)
              for moved, layout in adjusted),
            *((f"the layout of {release}", layout) for release, layout in others)]


def adjust(base: Layout, derived: Derived) -> list[tuple[str, Layout]]:
    """`base` with the offsets the machine code shows, and each way the TLS 1.3 arrays it does
    not show may have moved with those it does (fewest moved first), each said in a few words.

    An array before the first one shown, or after the last, moved as that one did; one between
    two shown arrays that moved by as much, as they did. Between two that moved by different
    amounts, members were inserted (or removed) somewhere: each place is a layout of its own.
    """
    changes: dict[str, int | bool] = {name: value for name, value in derived.items()
                                      if name not in EXTRA_FIELDS and hasattr(base, name)}
    s3 = int(changes.get("s3", base.s3))
    is_pointer = bool(changes.get("s3_is_pointer", base.s3_is_pointer))
    if not is_pointer:
        for extra, member in zip(EXTRA_FIELDS, ("s3_client_random", "s3_server_random"),
                                 strict=True):
            if extra in derived and member not in derived:
                changes[member] = int(derived[extra]) - s3
    arrays = [name for name in TLS13_ARRAYS if getattr(base, name) is not None]
    shown = [(i, int(derived[name]) - getattr(base, name))
             for i, name in enumerate(arrays) if name in derived]
    if not shown:
        return [("", dataclasses.replace(base, **changes))]
    fixed = dict(changes)
    fixed.update((name, getattr(base, name) + shown[0][1]) for name in arrays[:shown[0][0]])
    fixed.update((name, getattr(base, name) + shown[-1][1])
                 for name in arrays[shown[-1][0] + 1:])
    splits: list[list[tuple[str, dict[str, int]]]] = []  # per gap: (where, moves) choices
    for (i, before), (j, after) in itertools.pairwise(shown):
        between = arrays[i + 1:j]
        if before == after:
            fixed.update((name, getattr(base, name) + before) for name in between)
            continue
        splits.append([(f"moved from {between[k]} on" if k < len(between) else
                        f"moved from {arrays[j]} on",
                        {name: getattr(base, name) + (before if n < k else after)
                         for n, name in enumerate(between)})
                       for k in range(len(between) + 1)])
    ways = []
    for choice in itertools.islice(itertools.product(*splits), MAX_ADJUSTED):
        moves = {name: offset for _, each in choice for name, offset in each.items()}
        layout = dataclasses.replace(base, **fixed, **moves)
        moved = sum(getattr(layout, name) != getattr(base, name) for name in arrays)
        ways.append((moved, ", ".join(where for where, _ in choice), layout))
    ways.sort(key=lambda way: way[0])
    return [(where, layout) for _, where, layout in ways]
