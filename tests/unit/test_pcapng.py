"""keytap.sink.pcapng: files must be read exactly as written by tshark, capinfos, editcap and scapy.

tshark (with capinfos and editcap, Debian's wireshark-common) is a hard requirement of this
layer: without it these tests fail rather than skip, so a CI image that lost it is noticed.
"""

from __future__ import annotations

import datetime
import io
import shutil
import ssl
import struct
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import PcapNgReader, rdpcap

from keytap.events import Direction
from keytap.sink.pcapng import MAX_PACKET_LEN, PARTS_FROM, InterfaceDescription, PcapngWriter
from tests.support.pcapng_blocks import BT_DSB, BT_EPB, BT_IDB, BT_ISB, BT_SHB, walk

T0 = 1_700_000_000_123_456_789  # ns; the 9 digits must survive the round trip
OS_NAME = "Linux 6.1.0-test"
APPLICATION = "keytap 0.1.0 (test)"
INTERFACES = (
    InterfaceDescription("eth0", "pod veth, host side", MAX_PACKET_LEN),
    InterfaceDescription("lo", "loopback ✓", 96),
)
CLIENT_RANDOM = "CLIENT_RANDOM " + "ab" * 32 + " " + "cd" * 48 + "\n"
TLS13_LINE = "SERVER_HANDSHAKE_TRAFFIC_SECRET " + "01" * 32 + " " + "ef" * 32 + "\n"
KEYLOG = (CLIENT_RANDOM + TLS13_LINE).encode()  # 338 bytes: the DSB needs 2 bytes of padding
ISB_VALUES = {
    0: dict(start_ns=T0 - 5, end_ns=T0 + 10_000, received=1_000_000, dropped=7, delivered=5),
    1: dict(start_ns=T0 + 1, end_ns=(1 << 32) + 3, received=2, dropped=0, delivered=2),
}



def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found on PATH: install Debian's tshark (and wireshark-common); "
            "these tests check keytap's files with Wireshark's own reader",
            pytrace=False,
        )
    return path


def _run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def _frame(payload_len: int, sport: int) -> bytes:
    pkt = (
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / UDP(sport=sport, dport=9)
        / Raw(b"k" * payload_len)
    )
    return bytes(pkt)


@dataclass(frozen=True)
class Sent:
    """A packet as handed to write_packet, and what readers must report for it."""

    interface_id: int
    timestamp_ns: int
    data: bytes
    orig_len: int
    direction: Direction
    comment: str | None


def _sample_packets() -> list[Sent]:
    truncated = _frame(158, 4)  # 200 bytes on the wire, 96 captured (snaplen of "lo")
    huge = b"\x02" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(MAX_PACKET_LEN - 14)
    return [
        Sent(0, T0, _frame(19, 1), 61, Direction.INBOUND, "héllo ✓ first"),
        Sent(0, T0 + 1, _frame(20, 2), 62, Direction.OUTBOUND, None),
        Sent(1, T0 + 1_000, truncated[:96], 200, Direction.UNKNOWN, None),
        Sent(1, T0 + 1_001, _frame(21, 3), 63, Direction.UNKNOWN, "only a comment"),
        Sent(0, T0 + 2_000_000_000, huge, MAX_PACKET_LEN, Direction.OUTBOUND, "largest allowed"),
    ]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Sent], PcapngWriter]:
    """One file with every block kind: SHB, 2 IDBs, a DSB, EPBs of every flavour, 2 ISBs."""
    path = tmp_path_factory.mktemp("pcapng") / "sample.pcapng"
    sent = _sample_packets()
    with path.open("wb") as f:
        writer = PcapngWriter(f, INTERFACES, application=APPLICATION, os_name=OS_NAME)
        writer.write_secrets(KEYLOG)
        for s in sent:
            writer.write_packet(
                s.interface_id, s.timestamp_ns, s.data, s.orig_len, s.direction, s.comment
            )
        for if_id, values in ISB_VALUES.items():
            writer.write_statistics(if_id, T0 + 3_000_000_000, **values)
        writer.flush()
    return path, sent, writer


# --- options of the blocks tests.support.pcapng_blocks reads, checked byte by byte ---


def _options(buf: bytes) -> list[tuple[int, bytes]]:
    """Options up to opt_endofopt, checking padding; empty input means no options."""
    if not buf:
        return []
    opts, offset = [], 0
    while True:
        code, length = struct.unpack_from("<HH", buf, offset)
        if code == 0:
            assert length == 0
            assert offset + 4 == len(buf), "bytes after opt_endofopt"
            return opts
        value = buf[offset + 4 : offset + 4 + length]
        pad = buf[offset + 4 + length : offset + 4 + length + (-length % 4)]
        assert pad == bytes(len(pad)), "option padding not zero"
        opts.append((code, value))
        offset += 4 + length + (-length % 4)


def _epb(body: bytes) -> tuple[tuple[int, ...], bytes, list[tuple[int, bytes]]]:
    fields = struct.unpack_from("<5I", body)
    caplen = fields[3]
    padded = caplen + (-caplen % 4)
    assert body[20 + caplen : 20 + padded] == bytes(padded - caplen)
    return fields, body[20 : 20 + caplen], _options(body[20 + padded :])


# --- structure ----------------------------------------------------------------------------


def test_block_order_and_header_blocks(sample: tuple[Path, list[Sent], PcapngWriter]) -> None:
    path, sent, writer = sample
    raw = path.read_bytes()
    blocks = walk(raw)
    assert [b.type for b in blocks[:3]] == [BT_SHB, BT_IDB, BT_IDB]
    assert [b.type for b in blocks[3:]] == [BT_DSB] + [BT_EPB] * len(sent) + [BT_ISB] * 2
    assert writer.bytes_written == len(raw)
    assert writer.packets_written == len(sent)

    magic, major, minor, section_len = struct.unpack_from("<IHHq", blocks[0].body)
    assert (magic, major, minor, section_len) == (0x1A2B3C4D, 1, 0, -1)
    assert _options(blocks[0].body[16:]) == [(3, OS_NAME.encode()), (4, APPLICATION.encode())]

    for block, iface in zip(blocks[1:3], INTERFACES, strict=True):
        linktype, reserved, snaplen = struct.unpack_from("<HHI", block.body)
        assert (linktype, reserved, snaplen) == (1, 0, iface.snaplen)
        assert _options(block.body[8:]) == [
            (2, iface.name.encode()),
            (3, iface.description.encode()),
            (9, b"\x09"),
        ]


def test_epb_fields_and_options(sample: tuple[Path, list[Sent], PcapngWriter]) -> None:
    path, sent, _ = sample
    epbs = [b for b in walk(path.read_bytes()) if b.type == BT_EPB]
    for block, s in zip(epbs, sent, strict=True):
        (if_id, ts_high, ts_low, caplen, orig_len), data, opts = _epb(block.body)
        assert (if_id, (ts_high << 32) | ts_low) == (s.interface_id, s.timestamp_ns)
        assert (caplen, orig_len, data) == (len(s.data), s.orig_len, s.data)
        expected = []
        if s.direction != Direction.UNKNOWN:
            expected.append((2, struct.pack("<I", s.direction)))
        if s.comment is not None:
            expected.append((1, s.comment.encode()))
        assert opts == expected  # no options at all (not even endofopt) for a bare packet


def test_dsb_block(sample: tuple[Path, list[Sent], PcapngWriter]) -> None:
    path, _, _ = sample
    (dsb,) = [b for b in walk(path.read_bytes()) if b.type == BT_DSB]
    secrets_type, secrets_len = struct.unpack_from("<II", dsb.body)
    assert (secrets_type, secrets_len) == (0x544C534B, len(KEYLOG))
    assert dsb.body[8 : 8 + secrets_len] == KEYLOG
    assert dsb.body[8 + secrets_len :] == bytes(-len(KEYLOG) % 4)  # padding, no options


def test_isb_blocks(sample: tuple[Path, list[Sent], PcapngWriter]) -> None:
    path, _, _ = sample
    isbs = [b for b in walk(path.read_bytes()) if b.type == BT_ISB]
    assert len(isbs) == 2
    for block, (if_id, v) in zip(isbs, ISB_VALUES.items(), strict=True):
        got_if, ts_high, ts_low = struct.unpack_from("<III", block.body)
        assert (got_if, (ts_high << 32) | ts_low) == (if_id, T0 + 3_000_000_000)
        opts = _options(block.body[12:])

        def split_ts(ns: int) -> bytes:
            return struct.pack("<II", ns >> 32, ns & 0xFFFFFFFF)  # high word first

        assert opts == [
            (2, split_ts(v["start_ns"])),
            (3, split_ts(v["end_ns"])),
            (4, struct.pack("<Q", v["received"])),
            (5, struct.pack("<Q", v["dropped"])),
            (8, struct.pack("<Q", v["delivered"])),
        ]


def test_each_block_is_one_write() -> None:
    class Recorder(io.BytesIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[int] = []
            self.flushes = 0

        def write(self, b) -> int:  # type: ignore[no-untyped-def, override]
            self.writes.append(len(b))
            return super().write(b)

        def flush(self) -> None:
            self.flushes += 1

    stream = Recorder()
    writer = PcapngWriter(stream, INTERFACES, application="x", os_name="")
    assert len(stream.writes) == 1  # SHB and IDBs together: nothing can slip in between
    writer.write_packet(0, T0, b"abc", 3)
    writer.write_packet(1, T0, b"abcd", 4, Direction.INBOUND, "c")
    writer.write_secrets(b"x")
    writer.write_statistics(0, T0, start_ns=0, end_ns=1, received=0, dropped=0, delivered=0)
    writer.flush()
    blocks = walk(stream.getvalue())
    assert stream.writes[1:] == [12 + len(b.body) for b in blocks[3:]]
    assert stream.flushes == 1
    assert writer.bytes_written == len(stream.getvalue())
    assert writer.packets_written == 2
    assert _options(blocks[0].body[16:]) == [(4, b"x")]  # os_name="" leaves shb_os out


def test_a_large_packet_goes_in_parts_and_reads_the_same() -> None:
    """A stream with write_parts gets a large packet's block as its parts (its data not copied
    into a joined block), and the file is byte for byte what a plain stream gets."""
    class Parts(io.BytesIO):
        def __init__(self) -> None:
            super().__init__()
            self.parted: list[int] = []  # bytes of data in each block given in parts

        def write_parts(self, *parts: bytes) -> None:
            self.parted.append(len(parts[1]))
            self.write(b"".join(parts))

    plain, parted = io.BytesIO(), Parts()
    sizes = [1, PARTS_FROM - 1, PARTS_FROM, PARTS_FROM + 1, PARTS_FROM + 2, PARTS_FROM + 3]
    for stream in (plain, parted):
        writer = PcapngWriter(stream, INTERFACES, application="x", os_name="")
        for n, size in enumerate(sizes):
            data = bytes(range(256)) * (size // 256) + bytes(size % 256)
            writer.write_packet(n % 2, T0 + n, data, size + 7, Direction.INBOUND,
                                "c" * n if n % 3 else None)
    assert parted.parted == [size for size in sizes if size >= PARTS_FROM]
    assert parted.getvalue() == plain.getvalue()
    assert [len(b.body) for b in walk(plain.getvalue()) if b.type == BT_EPB][2] > PARTS_FROM


def test_default_os_name_is_recorded() -> None:
    stream = io.BytesIO()
    PcapngWriter(stream, [], application="app")
    (shb,) = walk(stream.getvalue())
    opts = dict(_options(shb.body[16:]))
    assert opts[4] == b"app"
    assert opts[3]  # platform system and release


# --- validation -----------------------------------------------------------------------------


@pytest.fixture()
def writer_and_stream() -> tuple[PcapngWriter, io.BytesIO]:
    stream = io.BytesIO()
    return PcapngWriter(stream, INTERFACES, application="x"), stream


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda w: w.write_packet(2, T0, b"a", 1), id="interface-too-high"),
        pytest.param(lambda w: w.write_packet(-1, T0, b"a", 1), id="interface-negative"),
        pytest.param(
            lambda w: w.write_packet(0, T0, bytes(MAX_PACKET_LEN + 1), MAX_PACKET_LEN + 1),
            id="packet-too-long",
        ),
        pytest.param(lambda w: w.write_packet(0, T0, b"abc", 2), id="orig-len-below-caplen"),
        pytest.param(lambda w: w.write_packet(0, -1, b"a", 1), id="negative-timestamp"),
        pytest.param(lambda w: w.write_packet(0, 1 << 64, b"a", 1), id="timestamp-overflow"),
        pytest.param(lambda w: w.write_packet(0, T0, b"a", 1 << 32), id="orig-len-overflow"),
        pytest.param(lambda w: w.write_packet(0, T0, b"a", 1, 3), id="bad-direction"),
        pytest.param(lambda w: w.write_packet(0, T0, b"a", 1, 3, "c"), id="bad-direction-comment"),
        pytest.param(
            lambda w: w.write_packet(0, T0, b"a", 1, Direction.INBOUND, "x" * 65536),
            id="comment-too-long",
        ),
        pytest.param(lambda w: w.write_secrets(b""), id="empty-keylog"),
        pytest.param(
            lambda w: w.write_statistics(
                2, T0, start_ns=0, end_ns=0, received=0, dropped=0, delivered=0
            ),
            id="isb-interface-too-high",
        ),
        pytest.param(
            lambda w: w.write_statistics(
                0, T0, start_ns=0, end_ns=0, received=-1, dropped=0, delivered=0
            ),
            id="isb-negative-counter",
        ),
    ],
)
def test_invalid_calls_raise_and_write_nothing(
    writer_and_stream: tuple[PcapngWriter, io.BytesIO], call
) -> None:  # type: ignore[no-untyped-def]
    writer, stream = writer_and_stream
    before = stream.getvalue()
    with pytest.raises(ValueError):
        call(writer)
    assert stream.getvalue() == before
    assert writer.bytes_written == len(before)
    assert writer.packets_written == 0


def test_bad_snaplen_raises() -> None:
    with pytest.raises(ValueError):
        PcapngWriter(io.BytesIO(), [InterfaceDescription("e", "", 1 << 32)], application="x")


# --- Wireshark's tools ----------------------------------------------------------------------


def test_tshark_reads_every_packet(sample: tuple[Path, list[Sent], PcapngWriter]) -> None:
    path, sent, _ = sample
    fields = [
        "frame.interface_id",
        "frame.interface_name",
        "frame.interface_description",
        "frame.len",
        "frame.cap_len",
        "frame.time_epoch",
        "frame.comment",
        "frame.packet_flags_direction",
        "frame.p2p_dir",
    ]
    args = [arg for field in fields for arg in ("-e", field)]
    out = _run(_tool("tshark"), "-n", "-r", str(path), "-T", "fields", *args)
    rows = [line.split("\t") for line in out.splitlines()]
    expected = []
    for s in sent:
        iface = INTERFACES[s.interface_id]
        sec, ns = divmod(s.timestamp_ns, 1_000_000_000)
        expected.append(
            [
                str(s.interface_id),
                iface.name,
                iface.description,
                str(s.orig_len),
                str(len(s.data)),
                f"{sec}.{ns:09d}",
                s.comment or "",
                {
                    Direction.UNKNOWN: "",
                    Direction.INBOUND: "0x00000001",
                    Direction.OUTBOUND: "0x00000002",
                }[s.direction],
                {Direction.UNKNOWN: "", Direction.INBOUND: "1", Direction.OUTBOUND: "0"}[
                    s.direction
                ],  # Wireshark's P2P_DIR_RECV / P2P_DIR_SENT
            ]
        )
    assert rows == expected
    truncated = rows[2]
    assert int(truncated[3]) > int(truncated[4])  # frame.len > frame.cap_len


def test_capinfos_sees_interfaces_secrets_and_statistics(
    sample: tuple[Path, list[Sent], PcapngWriter],
) -> None:
    path, sent, _ = sample
    out = _run(_tool("capinfos"), "-M", "-t", "-c", "-I", "-D", "-F", str(path))
    assert "File type:           pcapng" in out
    assert f"Number of packets:   {len(sent)}" in out
    assert "Number of interfaces in file: 2" in out
    assert "Number of decryption secrets in file: 1" in out
    assert f"Capture oper-sys:    {OS_NAME}" in out
    assert f"Capture application: {APPLICATION}" in out
    interfaces = out.split("Interface #")[1:]
    assert len(interfaces) == 2
    for text, iface in zip(interfaces, INTERFACES, strict=True):
        assert f"Name = {iface.name}\n" in text
        assert f"Description = {iface.description}\n" in text
        assert "Encapsulation = Ethernet (1 - ether)" in text
        assert f"Capture length = {iface.snaplen}\n" in text
        assert "Time precision = nanoseconds (9)" in text
        assert "Number of stat entries = 1" in text


def test_editcap_and_mergecap_accept_the_file(
    sample: tuple[Path, list[Sent], PcapngWriter], tmp_path: Path
) -> None:
    path, sent, _ = sample
    edited, merged = tmp_path / "edited.pcapng", tmp_path / "merged.pcapng"
    _run(_tool("editcap"), str(path), str(edited))
    _run(_tool("mergecap"), "-w", str(merged), str(path), str(path))
    out = _run(_tool("capinfos"), "-M", "-c", "-D", str(edited), str(merged))
    counts = [line for line in out.splitlines() if line.startswith("Number of packets")]
    assert counts == [f"Number of packets:   {len(sent)}", f"Number of packets:   {2 * len(sent)}"]
    assert "Number of decryption secrets in file: 1" in out.split(str(merged))[0]


def test_scapy_reads_every_packet(sample: tuple[Path, list[Sent], PcapngWriter]) -> None:
    path, sent, _ = sample
    got = []
    with PcapNgReader(str(path)) as reader:
        while True:
            try:
                got.append(reader.read_packet(size=MAX_PACKET_LEN))
            except EOFError:
                break
    assert len(got) == len(sent)
    for pkt, s in zip(got, sent, strict=True):
        assert bytes(pkt) == s.data
        assert pkt.wirelen == s.orig_len
        assert pkt.time == Decimal(s.timestamp_ns) / 1_000_000_000
        assert pkt.sniffed_on == INTERFACES[s.interface_id].name
        assert pkt.direction == (None if s.direction == Direction.UNKNOWN else s.direction)
        assert pkt.comments == (None if s.comment is None else [s.comment.encode()])
    assert len(rdpcap(str(path))) == len(sent)


def test_scapy_parses_the_dsb(sample: tuple[Path, list[Sent], PcapngWriter]) -> None:
    """Scapy hands a DSB's key log to its TLS layer; load that in a child to keep ours clean."""
    path, _, _ = sample
    script = (
        "import sys; from scapy.config import conf; import scapy.layers.tls.all\n"
        "from scapy.utils import PcapNgReader\n"
        "with PcapNgReader(sys.argv[1]) as r:\n"
        "    r.read_all()\n"
        "    keys = conf.tls_nss_keys\n"
        "    print(sorted((k, len(v)) for k, v in keys.items()))\n"
    )
    out = _run(sys.executable, "-c", script, str(path))
    assert "CLIENT_RANDOM" in out and "SERVER_HANDSHAKE_TRAFFIC_SECRET" in out


# --- the point of it all: Wireshark decrypts TLS with the file's own secrets ----------------


def _tls_session(tmp_path: Path) -> tuple[bytes, list[tuple[bool, bytes]]]:
    """A real in-memory TLS 1.3 exchange: (key log, [(from_client, bytes on the wire)])."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keytap.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    keylog_file = tmp_path / "keylog.txt"
    client_ctx.keylog_filename = str(keylog_file)

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    wire: list[tuple[bool, bytes]] = []

    def pump() -> None:
        for from_client, out, peer_in in ((True, c_out, s_in), (False, s_out, c_in)):
            data = out.read()
            if data:
                wire.append((from_client, data))
                peer_in.write(data)

    def step(fn) -> bool:  # type: ignore[no-untyped-def]
        try:
            fn()
            return True
        except ssl.SSLWantReadError:
            return False

    done = [False, False]
    for _ in range(10):
        done = [done[0] or step(client.do_handshake), done[1] or step(server.do_handshake)]
        pump()
        if all(done):
            break
    assert all(done), "TLS handshake did not finish"
    client.write(b"GET /keytap-decrypted HTTP/1.1\r\nHost: keytap.test\r\n\r\n")
    pump()
    assert server.read(4096).startswith(b"GET /keytap-decrypted")
    server.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    pump()
    return keylog_file.read_bytes(), wire


def _tcp_frames(wire: list[tuple[bool, bytes]]) -> list[tuple[bool, bytes]]:
    """Wrap the TLS byte streams in a TCP connection 10.0.0.1:40000 -> 10.0.0.2:443."""
    seq = {True: 1000, False: 5000}
    frames: list[tuple[bool, bytes]] = []

    def seg(from_client: bool, flags: str, payload: bytes = b"") -> None:
        src, dst = ("10.0.0.1", "10.0.0.2") if from_client else ("10.0.0.2", "10.0.0.1")
        sport, dport = (40000, 443) if from_client else (443, 40000)
        tcp = TCP(sport=sport, dport=dport, flags=flags, seq=seq[from_client], window=65535)
        if "A" in flags:
            tcp.ack = seq[not from_client]
        pkt = Ether() / IP(src=src, dst=dst) / tcp / Raw(payload)
        frames.append((from_client, bytes(pkt)))
        seq[from_client] += len(payload) + (1 if "S" in flags else 0)

    seg(True, "S")
    seg(False, "SA")
    seg(True, "A")
    for from_client, data in wire:
        for i in range(0, len(data), 1400):
            seg(from_client, "PA", data[i : i + 1400])
    return frames


@pytest.mark.parametrize("with_secrets", [True, False], ids=["with-dsb", "without-dsb"])
def test_tshark_decrypts_tls_with_the_dsb(tmp_path: Path, with_secrets: bool) -> None:
    keylog, wire = _tls_session(tmp_path)
    assert b"CLIENT_TRAFFIC_SECRET_0" in keylog
    path = tmp_path / "tls.pcapng"
    with path.open("wb") as f:
        writer = PcapngWriter(f, INTERFACES[:1], application=APPLICATION)
        if with_secrets:
            writer.write_secrets(keylog)
        for i, (from_client, frame) in enumerate(_tcp_frames(wire)):
            direction = Direction.INBOUND if from_client else Direction.OUTBOUND
            writer.write_packet(0, T0 + i * 1000, frame, len(frame), direction)
    out = _run(
        _tool("tshark"), "-n", "-r", str(path), "-Y", "http", "-T", "fields",
        "-e", "http.request.uri", "-e", "http.response.code",
    )  # fmt: skip
    if with_secrets:
        assert out.split() == ["/keytap-decrypted", "204"]
    else:
        assert out.split() == []  # the secrets, not luck, decrypt it
