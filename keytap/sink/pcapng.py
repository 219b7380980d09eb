"""A small, fast pcapng writer for packets and the TLS secrets that decrypt them.

Hand-written because no Python library writes Decryption Secrets Blocks (scapy only reads them),
and because keytap needs one file in which Wireshark finds both packets and keys.

Layout, as Wireshark's tools expect it: one Section Header Block, then one Interface Description
Block per interface, then any mix of Enhanced Packet, Decryption Secrets and Interface Statistics
Blocks. editcap and mergecap 4.0 refuse files with anything between the SHB and the IDBs, so all
interfaces are given up front. Output is little-endian; timestamps are nanoseconds since the epoch
(if_tsresol 9). Every block goes to the stream in one `write` call so that a reader tailing the
file never sees a partial block from us; a large packet's block goes in one `write_parts` call
where the stream has one (sink.files.WholeBlocks), its data not copied into a joined block.

Spec: https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-02.html
"""

from __future__ import annotations

import platform
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from keytap.events import Direction

__all__ = [
    "LINKTYPE_ETHERNET",
    "MAX_PACKET_LEN",
    "SECRETS_TYPE_TLS_KEY_LOG",
    "InterfaceDescription",
    "PcapngWriter",
    "secrets_block",
]

LINKTYPE_ETHERNET = 1
# Wireshark's WTAP_MAX_PACKET_SIZE_STANDARD: a longer EPB makes tshark stop reading the file.
MAX_PACKET_LEN = 262144
# From this many bytes of data on, a packet's block is handed over in parts: joining them would
# copy each large packet (GSO, up to 64 KB) once more; below, one buffer costs less to write.
PARTS_FROM = 4096
SECRETS_TYPE_TLS_KEY_LOG = 0x544C534B  # "TLSK"

_BT_SHB = 0x0A0D0D0A
_BT_IDB = 0x00000001
_BT_ISB = 0x00000005
_BT_EPB = 0x00000006
_BT_DSB = 0x0000000A
_BYTE_ORDER_MAGIC = 0x1A2B3C4D

_OPT_ENDOFOPT = 0
_OPT_COMMENT = 1
_SHB_OS = 3
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_DESCRIPTION = 3
_IF_TSRESOL = 9
_EPB_FLAGS = 2
_ISB_STARTTIME = 2
_ISB_ENDTIME = 3
_ISB_IFRECV = 4
_ISB_IFDROP = 5
_ISB_FILTERACCEPT = 6
_ISB_USRDELIV = 8

_TSRESOL_NS = 9  # 10^-9 s
_MAX_OPTION_LEN = 0xFFFF

_U32 = struct.Struct("<I")
_OPT_HEAD = struct.Struct("<HH")
_OPT_U32 = struct.Struct("<HHI")
_OPT_U64 = struct.Struct("<HHQ")
_OPT_TIME = struct.Struct("<HHII")  # 64-bit timestamp as high then low 32 bits
_SHB_HEAD = struct.Struct("<IIIHHq")
_IDB_FIXED = struct.Struct("<HHI")  # linktype, reserved, snaplen
_EPB_HEAD = struct.Struct("<IIIIIII")
_ISB_HEAD = struct.Struct("<IIIII")
_DSB_HEAD = struct.Struct("<IIII")
# Padding of the packet data fused with the trailing block length, indexed by len(data) % 4,
# so the common packet needs just two packs and one join.
_EPB_TAILS = tuple(struct.Struct(f"<{(-n) % 4}xI") for n in range(4))
_PADDING = tuple(b"\0" * ((-n) % 4) for n in range(4))
_ENDOFOPT = _OPT_HEAD.pack(_OPT_ENDOFOPT, 0)
# epb_flags for each direction, ending the option list when it is the only option.
_DIRECTION_OPTION = {
    Direction.UNKNOWN: b"",
    Direction.INBOUND: _OPT_U32.pack(_EPB_FLAGS, 4, Direction.INBOUND),
    Direction.OUTBOUND: _OPT_U32.pack(_EPB_FLAGS, 4, Direction.OUTBOUND),
}
_DIRECTION_ONLY = {d: (o + _ENDOFOPT if o else b"") for d, o in _DIRECTION_OPTION.items()}


@dataclass(frozen=True)
class InterfaceDescription:
    """One capture interface; its position in the writer's list is its pcapng interface id."""

    name: str  # if_name
    description: str  # if_description
    snaplen: int
    linktype: int = LINKTYPE_ETHERNET


def _option(code: int, value: bytes) -> bytes:
    """One option with its value padded to 32 bits."""
    if len(value) > _MAX_OPTION_LEN:
        raise ValueError(f"pcapng option {code} is {len(value)} bytes, at most 65535 fit")
    return _OPT_HEAD.pack(code, len(value)) + value + _PADDING[len(value) & 3]


def _str_option(code: int, value: str) -> bytes:
    """A UTF-8 string option (no NUL, as the spec says), or nothing for an empty string."""
    return _option(code, value.encode()) if value else b""


def _end_options(options: bytes) -> bytes:
    """Terminate a non-empty option list with opt_endofopt; an empty one stays empty."""
    return options + _ENDOFOPT if options else b""


def _block(block_type: int, body: bytes) -> bytes:
    """Frame a body (already a multiple of 4 bytes) with type and both length fields."""
    total = 12 + len(body)
    return _U32.pack(block_type) + _U32.pack(total) + body + _U32.pack(total)


def _interface_block(iface: InterfaceDescription) -> bytes:
    """An Interface Description Block, nanosecond timestamps."""
    options = _end_options(
        _str_option(_IF_NAME, iface.name)
        + _str_option(_IF_DESCRIPTION, iface.description)
        + _option(_IF_TSRESOL, bytes((_TSRESOL_NS,)))
    )
    try:
        fixed = _IDB_FIXED.pack(iface.linktype, 0, iface.snaplen)
    except struct.error as exc:
        raise ValueError(f"bad linktype or snaplen in {iface!r}") from exc
    return _block(_BT_IDB, fixed + options)


def secrets_block(keylog: bytes) -> bytes:
    """A Decryption Secrets Block holding NSS key-log lines."""
    if not keylog:
        raise ValueError("empty key log")
    n = len(keylog)
    total = _DSB_HEAD.size + n + ((-n) & 3) + 4
    return b"".join((_DSB_HEAD.pack(_BT_DSB, total, SECRETS_TYPE_TLS_KEY_LOG, n), keylog,
                     _PADDING[n & 3], _U32.pack(total)))


def _joined(stream: BinaryIO) -> Callable[..., None]:
    """write_parts for a stream that takes only whole blocks."""
    return lambda *parts: stream.write(b"".join(parts))


class PcapngWriter:
    """Writes one pcapng section to a binary stream; it does not own (or close) the stream."""

    def __init__(
        self,
        stream: BinaryIO,
        interfaces: Sequence[InterfaceDescription],
        *,
        application: str,
        os_name: str | None = None,
    ) -> None:
        """Write the SHB and every IDB at once: nothing may come between them.

        `os_name` defaults to this machine's "system release" (as dumpcap records it); pass ""
        to leave shb_os out.
        """
        self._stream = stream
        self._write_parts = getattr(stream, "write_parts", None) or _joined(stream)
        self._interfaces = tuple(interfaces)
        self._n_interfaces = len(self._interfaces)
        self._packets_written = 0
        self._bytes_written = 0
        if os_name is None:
            os_name = f"{platform.system()} {platform.release()}".strip()

        shb_options = _end_options(
            _str_option(_SHB_OS, os_name) + _str_option(_SHB_USERAPPL, application)
        )
        shb_len = _SHB_HEAD.size + len(shb_options) + 4
        head = b"".join(
            (
                _SHB_HEAD.pack(_BT_SHB, shb_len, _BYTE_ORDER_MAGIC, 1, 0, -1),  # length unknown
                shb_options,
                _U32.pack(shb_len),
            )
        )
        # One write for the whole header, so a reader never sees an SHB without its IDBs.
        header = b"".join([head, *map(_interface_block, self._interfaces)])
        self.header_size = len(header)  # where blocks after the header may be put first
        self._write(header)

    def add_interface(self, interface: InterfaceDescription) -> int:
        """An interface that appeared during the capture (a new pod): its IDB now, later in
        the section as pcapng allows; returns its interface id."""
        self._write(_interface_block(interface))
        self._interfaces += (interface,)
        self._n_interfaces += 1
        return self._n_interfaces - 1

    @property
    def packets_written(self) -> int:
        """Enhanced Packet Blocks written so far."""
        return self._packets_written

    @property
    def bytes_written(self) -> int:
        """Bytes handed to the stream so far, headers included."""
        return self._bytes_written

    def _write(self, block: bytes) -> None:
        self._stream.write(block)
        self._bytes_written += len(block)

    def _check_interface(self, interface_id: int) -> None:
        if not 0 <= interface_id < self._n_interfaces:
            raise ValueError(
                f"interface id {interface_id} out of range: {self._n_interfaces} interface(s)"
            )

    def write_packet(
        self,
        interface_id: int,
        timestamp_ns: int,
        data: bytes,
        orig_len: int,
        direction: Direction = Direction.UNKNOWN,
        comment: str | None = None,
    ) -> None:
        """Write one Enhanced Packet Block.

        `timestamp_ns` is wall-clock nanoseconds since the epoch. Snapping `data` to the
        interface's snaplen is the caller's job; `orig_len` is the length on the wire.
        """
        # The hot path: keep it to a few comparisons, two packs and one join.
        if not 0 <= interface_id < self._n_interfaces:
            self._check_interface(interface_id)
        caplen = len(data)
        if caplen > MAX_PACKET_LEN:
            raise ValueError(f"packet of {caplen} bytes exceeds {MAX_PACKET_LEN} (tshark stops)")
        if orig_len < caplen:
            raise ValueError(f"orig_len {orig_len} is less than the {caplen} bytes captured")
        if comment is None:
            try:
                options = _DIRECTION_ONLY[direction]
            except KeyError:
                raise ValueError(f"bad direction {direction!r}") from None
        else:
            options = self._packet_options(direction, comment)
        padded = caplen + ((-caplen) & 3)
        total = 32 + padded + len(options)
        try:
            head = _EPB_HEAD.pack(
                _BT_EPB,
                total,
                interface_id,
                timestamp_ns >> 32,
                timestamp_ns & 0xFFFFFFFF,
                caplen,
                orig_len,
            )
        except struct.error as exc:
            raise ValueError(f"timestamp {timestamp_ns} or orig_len {orig_len} bad") from exc
        if caplen >= PARTS_FROM:
            self._write_parts(head, data, _PADDING[caplen & 3] + options + _U32.pack(total))
        elif options:
            self._stream.write(
                b"".join((head, data, _PADDING[caplen & 3], options, _U32.pack(total))))
        else:
            self._stream.write(b"".join((head, data, _EPB_TAILS[caplen & 3].pack(total))))
        self._bytes_written += total
        self._packets_written += 1

    @staticmethod
    def _packet_options(direction: Direction, comment: str) -> bytes:
        try:
            flags = _DIRECTION_OPTION[direction]
        except KeyError:
            raise ValueError(f"bad direction {direction!r}") from None
        return flags + _option(_OPT_COMMENT, comment.encode()) + _ENDOFOPT

    def write_secrets(self, keylog: bytes) -> None:
        """Write one Decryption Secrets Block holding NSS key-log lines (SSLKEYLOGFILE format).

        Wireshark applies secrets to the packets after them, so write keys before the
        handshake's packets when possible.
        """
        self._write(secrets_block(keylog))

    def write_statistics(
        self,
        interface_id: int,
        timestamp_ns: int,
        *,
        start_ns: int,
        end_ns: int,
        received: int,
        dropped: int,
        delivered: int,
        filter_accepted: int | None = None,
    ) -> None:
        """Write one Interface Statistics Block: capture window and packet counters.

        `received` is isb_ifrecv, `dropped` isb_ifdrop, `delivered` isb_usrdeliv,
        `filter_accepted` isb_filteraccept.
        """
        self._check_interface(interface_id)
        try:
            options = b"".join(
                (
                    _OPT_TIME.pack(_ISB_STARTTIME, 8, start_ns >> 32, start_ns & 0xFFFFFFFF),
                    _OPT_TIME.pack(_ISB_ENDTIME, 8, end_ns >> 32, end_ns & 0xFFFFFFFF),
                    _OPT_U64.pack(_ISB_IFRECV, 8, received),
                    _OPT_U64.pack(_ISB_IFDROP, 8, dropped),
                    b"" if filter_accepted is None
                    else _OPT_U64.pack(_ISB_FILTERACCEPT, 8, filter_accepted),
                    _OPT_U64.pack(_ISB_USRDELIV, 8, delivered),
                    _ENDOFOPT,
                )
            )
            total = _ISB_HEAD.size + len(options) + 4
            head = _ISB_HEAD.pack(
                _BT_ISB, total, interface_id, timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF
            )
        except struct.error as exc:
            raise ValueError("ISB timestamp or counter out of range") from exc
        self._write(b"".join((head, options, _U32.pack(total))))

    def flush(self) -> None:
        """Flush the underlying stream."""
        self._stream.flush()
