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
OpenSSL) is such a build too: see `machine_code_offsets` and `accessors.mismatches`.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Mapping
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
# The connection's own members the machine code may show, which the arrays sit among.
CONNECTION_MEMBERS = ("ssl_type", "ssl_version", "server", "s3", "session", *TLS13_ARRAYS)
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
    not show may have moved with the members of the connection it does, each said in a few
    words.

    An array before every member shown, or after every one, moved as the nearest one did; one
    between two shown members that moved by as much, as they did. Between two that moved by
    different amounts, members were inserted (or removed) somewhere: each place is a layout of
    its own, the ends of the gap first (all of its arrays moved, or none), then places
    further in. (A shared libssl shows few arrays, a static one more: quictls's three arrays
    sit before the exporter secret, which moved, after `s3` and, in a static build,
    handshake_secret, which did not.)
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
    shown = sorted((getattr(base, name), int(derived[name]) - getattr(base, name), name)
                   for name in CONNECTION_MEMBERS
                   if name in derived and getattr(base, name) is not None)
    unshown = sorted((getattr(base, name), name) for name in TLS13_ARRAYS
                     if name not in derived and getattr(base, name) is not None)
    if not shown:
        return [("", dataclasses.replace(base, **changes))]
    fixed = dict(changes)
    # index in `shown` of the member after a gap (never the first: see the shifts) -> arrays
    gaps: dict[int, list[tuple[int, str]]] = {}
    offsets = [offset for offset, _, _ in shown]
    for offset, name in unshown:
        after = bisect.bisect(offsets, offset)
        before_shift = shown[after - 1][1] if after else shown[0][1]
        after_shift = shown[after][1] if after < len(shown) else shown[-1][1]
        if before_shift == after_shift:
            fixed[name] = offset + before_shift
        else:
            gaps.setdefault(after, []).append((offset, name))
    places = [_places(arrays, shown[after - 1][1], shown[after]) for after, arrays in gaps.items()]
    ways = []
    for choice in itertools.islice(itertools.product(*places), MAX_ADJUSTED):
        moves = {name: offset for _, _, each in choice for name, offset in each.items()}
        ways.append((sum(rank for rank, _, _ in choice), ", ".join(where for _, where, _ in choice),
                     dataclasses.replace(base, **fixed, **moves)))
    ways.sort(key=lambda way: way[0])
    return [(where, layout) for _, where, layout in ways]


def _places(arrays: list[tuple[int, str]], before_shift: int,
            after: tuple[int, int, str]) -> list[tuple[int, str, dict[str, int]]]:
    """Where members went in among `arrays` (offset, name), between a shown member that moved
    by `before_shift` and `after` (offset, shift, name): each place as (rank, in words, the
    arrays' offsets), best ranked first."""
    after_shift, after_name = after[1], after[2]
    out = []
    for place in range(len(arrays) + 1):
        first_moved = arrays[place][1] if place < len(arrays) else after_name
        out.append((_rank(place, len(arrays)), f"moved from {first_moved} on",
                    {name: offset + (before_shift if n < place else after_shift)
                     for n, (offset, name) in enumerate(arrays)}))
    return sorted(out, key=lambda each: each[0])


def _rank(place: int, count: int) -> int:
    """Members inserted before all `count` arrays of a gap (place 0) first, after all of them
    (place `count`) next, then the places next to those, and so on inwards."""
    return 2 * min(place, count - place) + (place > count - place)
