"""Byte offsets of OpenSSL's private TLS structs, per release and per binary build id.

The uprobes read secrets straight out of ``SSL`` / ``SSL_SESSION`` memory; those structs are
private and move between releases, so keytap ships a table generated from OpenSSL's own
headers (``tools/gen_offsets.py``, see ``offsets/README.md``).  This module loads that table,
or a user's file of the same shape (``--offsets FILE``), and answers "how is this libssl
laid out?".  A build-id entry wins over a version entry because a distro may patch a release.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from keytap.errors import KeytapError
from keytap.resources import data_dir

DEFAULT_PATH = data_dir("offsets") / "openssl.json"


@dataclass(frozen=True)
class Layout:
    """Where keytap finds each value, for one OpenSSL layout.

    Offsets named after the connection (``ssl_version``, ``server``, ``s3``, ``session`` and
    the TLS 1.3 arrays) are from the ``SSL *`` the application passes; from 3.2 that points
    at ``struct ssl_connection_st``, whose first member is the ``struct ssl_st`` with
    ``type``.  ``s3_*`` are relative to the s3 state (reached through a pointer at ``s3``
    when ``s3_is_pointer``, else embedded at ``s3``), ``session_*`` relative to
    ``SSL_SESSION``, ``cipher_id`` relative to ``SSL_CIPHER``.  None means the member does
    not exist in that release (e.g. TLS 1.3 secrets before 1.1.1, ``ssl_type`` before 3.2).
    Sizes are in bytes.
    """

    ssl_version: int
    ssl_type: int | None
    server: int
    s3: int
    s3_client_random: int
    s3_server_random: int
    session: int
    session_master_key: int
    session_master_key_length: int
    session_cipher: int
    session_cipher_id: int
    cipher_id: int
    early_secret: int | None
    handshake_secret: int | None
    master_secret: int | None
    resumption_master_secret: int | None
    client_finished_secret: int | None
    server_finished_secret: int | None
    server_finished_hash: int | None
    handshake_traffic_hash: int | None
    client_app_traffic_secret: int | None
    server_app_traffic_secret: int | None
    exporter_master_secret: int | None
    early_exporter_master_secret: int | None
    s3_is_pointer: bool
    master_key_size: int
    secret_size: int | None
    session_master_key_length_size: int
    session_cipher_id_size: int
    cipher_id_size: int
    ssl_size: int

    @property
    def has_tls13(self) -> bool:
        """True when the release keeps TLS 1.3 secrets in the connection (1.1.1 and later)."""
        return self.client_app_traffic_secret is not None

    @classmethod
    def from_dict(cls, data: Any, where: str = "layout") -> Layout:
        """Build from a JSON object, checking every field's type; unknown keys are ignored
        so that a table from a newer generator still loads."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                raise ValueError(f"{where}: missing field {f.name!r}")
            value = data[f.name]
            if f.type == "bool":
                ok = isinstance(value, bool)
            else:
                ok = (value is None and "None" in str(f.type)) or (
                    isinstance(value, int) and not isinstance(value, bool) and value >= 0
                )
            if not ok:
                raise ValueError(f"{where}: field {f.name!r} has invalid value {value!r}")
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class VersionEntry:
    """One row of ``versions`` or ``build_ids``: which layout, and where it came from."""

    layout: str
    tag: str | None = None
    version: str | None = None


class OffsetTable:
    """The loaded table: layouts stored once, referenced by version and by build id."""

    def __init__(
        self,
        layouts: dict[str, Layout],
        versions: dict[str, VersionEntry],
        build_ids: dict[str, VersionEntry],
        generator: str | None = None,
        path: Path | None = None,
    ) -> None:
        self.layouts = layouts
        self._versions = versions
        self._build_ids = build_ids
        self.generator = generator
        self.path = path

    @property
    def shipped(self) -> bool:
        """The committed table, whose version entries are upstream releases' layouts (a
        user's --offsets FILE describes their own builds: taken as it is)."""
        return self.path == DEFAULT_PATH

    @classmethod
    def load(cls, path: Path | None = None) -> OffsetTable:
        """Read the shipped table, or `path` (the ``--offsets FILE`` override).

        Raises ValueError with the file name and the offending entry when the file is not
        a table of the expected shape, so a bad override fails loudly at startup instead
        of as wrong bytes read from a process.
        """
        path = DEFAULT_PATH if path is None else Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"{path}: cannot read offsets table: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, path: Path | None = None) -> OffsetTable:
        """Validate and build from already-parsed JSON."""
        src = str(path) if path else "offsets table"
        if not isinstance(data, dict):
            raise ValueError(f"{src}: top level must be an object")
        for key in ("layouts", "versions"):
            if not isinstance(data.get(key), dict):
                raise ValueError(f"{src}: missing or invalid {key!r} object")
        build_ids_raw = data.get("build_ids", {})
        if not isinstance(build_ids_raw, dict):
            raise ValueError(f"{src}: 'build_ids' must be an object")

        layouts = {
            str(h): Layout.from_dict(body, f"{src}: layout {h}")
            for h, body in data["layouts"].items()
        }

        def entry(kind: str, key: str, body: Any) -> VersionEntry:
            where = f"{src}: {kind} {key!r}"
            if not isinstance(body, dict) or not isinstance(body.get("layout"), str):
                raise ValueError(f"{where}: expected an object with a 'layout' string")
            if body["layout"] not in layouts:
                raise ValueError(f"{where}: refers to unknown layout {body['layout']!r}")
            tag, version = body.get("tag"), body.get("version")
            if tag is not None and not isinstance(tag, str):
                raise ValueError(f"{where}: 'tag' must be a string")
            if version is not None and not isinstance(version, str):
                raise ValueError(f"{where}: 'version' must be a string")
            return VersionEntry(layout=body["layout"], tag=tag, version=version)

        versions = {str(v): entry("version", v, b) for v, b in data["versions"].items()}
        build_ids = {
            normalize_build_id(b): entry("build id", b, body) for b, body in build_ids_raw.items()
        }
        generator = data.get("generator")
        return cls(
            layouts,
            versions,
            build_ids,
            generator if isinstance(generator, str) else None,
            path,
        )

    def lookup(self, version: str, build_id: str | None = None) -> Layout | None:
        """Layout for a libssl: its build id if known (exact binary), else its version.

        `version` is the bare release ("3.0.19", "1.1.1l"); a leading "OpenSSL " is
        tolerated.  Returns None when neither is in the table.
        """
        return self.lookup_build(build_id) or self.lookup_version(version)

    def lookup_build(self, build_id: str | None) -> Layout | None:
        """Layout of this very binary, by its build id."""
        hit = self._build_ids.get(normalize_build_id(build_id)) if build_id else None
        return self.layouts[hit.layout] if hit is not None else None

    def lookup_version(self, version: str) -> Layout | None:
        """Layout of the release (builds of it may differ: see tls.candidates)."""
        hit = self._versions.get(normalize_version(version))
        return self.layouts[hit.layout] if hit is not None else None

    def candidates(self, version: str) -> list[tuple[str, Layout]]:
        """Layouts worth trying for a build with no exact entry, most likely first.

        The releases nearest to `version` in its own series (one above, one below, and so
        on outwards), then the rest of its major.minor, then the releases of the nearest other
        series. Each layout once, labelled by the release it was first taken from. Only a
        proof from the wire decides which one fits (see tls.selfcheck).
        """
        key = _version_key(normalize_version(version))
        if key[0] == 999:
            return []
        ordered = sorted(self._versions, key=lambda v: _distance(_version_key(v), key))
        result: dict[str, tuple[str, Layout]] = {}
        for each in ordered:
            layout_id = self._versions[each].layout
            result.setdefault(layout_id, (each, self.layouts[layout_id]))
        return list(result.values())

    def versions(self) -> list[str]:
        """Release versions in the table, oldest first."""
        return sorted(self._versions, key=_version_key)

    def build_ids(self) -> list[str]:
        """Build ids with their own entry."""
        return sorted(self._build_ids)

    def entry(self, version: str) -> VersionEntry | None:
        """Provenance of a version (tag it was generated from, layout hash)."""
        return self._versions.get(normalize_version(version))


def normalize_build_id(build_id: str) -> str:
    """Build ids are compared as lowercase hex without separators."""
    return build_id.strip().lower().replace(":", "").replace("-", "")


def normalize_version(version: str) -> str:
    v = version.strip()
    if v.lower().startswith("openssl "):
        v = v[len("openssl ") :].strip()
    return v.split()[0] if v else v


def _distance(candidate: tuple[Any, ...], target: tuple[Any, ...]) -> tuple[Any, ...]:
    """Sort key: same major.minor first, then by how many releases apart (above before below
    at equal distance: a newer release's layout is the likelier one to have been backported)."""
    same_series = candidate[:2] == target[:2]
    series_gap = abs((candidate[0] * 100 + candidate[1]) - (target[0] * 100 + target[1]))
    patch_gap = _patch_number(candidate) - _patch_number(target)
    return (not same_series, series_gap, abs(patch_gap), patch_gap < 0)


def _patch_number(key: tuple[Any, ...]) -> int:
    """1.1.1w and 3.0.22 alike as one number: patch level * 27 + letter index."""
    patch = key[2] if len(key) > 3 and isinstance(key[2], int) else 0
    letters = key[-1] if isinstance(key[-1], str) else ""
    return patch * 27 + sum(ord(c) - ord("a") + 1 for c in letters)


def _version_key(version: str) -> tuple[Any, ...]:
    head, _, _ = version.partition("-")
    nums = head.rstrip("abcdefghijklmnopqrstuvwxyz")
    letters = head[len(nums) :]
    try:
        return (*(int(p) for p in nums.split(".")), letters)
    except ValueError:
        return (999, version)


def load_offsets(path: Path | None) -> OffsetTable:
    """The committed table, or the user's --offsets FILE, with a one-line error if unusable."""
    try:
        return OffsetTable.load(path)
    except (OSError, ValueError) as error:
        raise KeytapError(f"cannot use offsets table {path or 'offsets/openssl.json'}: {error}"
                          ) from None
