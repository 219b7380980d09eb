"""The records, enums and sizes keytap shares with bpf/: defined here once, passed as -D.

The C side declares the same structs field by field (BPF C cannot import Python);
tests/unit/test_abi.py parses bpf/*.c and checks that both sides agree.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# bpf/capture.c ---------------------------------------------------------------------------------
MAX_SNAPLEN = 262144  # larger packets make Wireshark stop reading the rest of the file
PACKET_HEADER = struct.Struct("<QIIII")  # struct packet_header
PACKET_HEADER_FIELDS = ("ktime_ns", "ifindex", "orig_len", "cap_len", "direction")

# bpf/tls.c -------------------------------------------------------------------------------------
LIBRARY_GROUPS = 512  # OpenSSL builds probed at once: a group each, its uprobes' cookie
CANDIDATES = 4  # layouts a group reads with at once while the build's layout is being proven
LAYOUT_SLOTS = 1024  # layouts in the kernel; each slot is written once, then only switched off
ABSENT = -1  # a layout field the release does not have; ssl_version ABSENT = slot switched off
KEY_COUNTERS = ("implausible_version", "ring_full", "not_tls")  # enum counter, per slot
LAYOUT_FIELDS = (  # struct layout, in order; every field an s32
    "ssl_version", "ssl_type", "server", "s3", "s3_is_pointer", "s3_client_random", "session",
    "session_master_key", "session_master_key_length", "session_cipher", "cipher_id",
    "handshake_secret", "handshake_traffic_hash", "client_app_traffic_secret",
    "server_app_traffic_secret", "exporter_master_secret",
)
RANDOM_SIZE = 32  # a ClientHello's random
SECRET_SIZE = 64  # EVP_MAX_MD_SIZE: room for any TLS 1.3 secret
MASTER_KEY_SIZE = 48  # SSL_MAX_MASTER_KEY_LENGTH
COMM_SIZE = 16  # TASK_COMM_LEN


class SecretsEvent(NamedTuple):
    """struct secrets_event (bpf/tls.c), as SECRETS_EVENT unpacks it: arrays as bytes."""

    ktime_ns: int
    ssl: int
    tgid: int
    slot: int
    version: int
    server: int
    cipher_id: int
    master_key_length: int
    client_random: bytes
    master_key: bytes
    handshake_secret: bytes
    handshake_traffic_hash: bytes
    client_app_traffic_secret: bytes
    server_app_traffic_secret: bytes
    exporter_master_secret: bytes
    comm: bytes


SECRETS_EVENT = struct.Struct(f"<QQIIiiII{RANDOM_SIZE}s{MASTER_KEY_SIZE}s"
                              + f"{SECRET_SIZE}s" * 5 + f"{COMM_SIZE}s")

# bpf/go_tls.c ----------------------------------------------------------------------------------
GO_BUILDS = 512  # Go binaries probed at once (their uprobes' cookie), one self-check slot each
GO_FIRST_SLOT = LAYOUT_SLOTS  # Go builds' slots follow OpenSSL's layout slots
GO_LABEL_SIZE = 32  # longest key-log label: CLIENT_HANDSHAKE_TRAFFIC_SECRET (31)
GO_SECRET_SIZE = 64  # longest secret (48: SHA-384), with room
GO_COUNTERS = ("implausible", "ring_full")  # enum go_counter, per build


class GoSecretEvent(NamedTuple):
    """struct go_secret_event (bpf/go_tls.c), as GO_SECRET_EVENT unpacks it."""

    ktime_ns: int
    function_address: int
    return_address: int
    tgid: int
    build: int
    label_len: int
    secret_len: int
    label: bytes
    client_random: bytes
    secret: bytes
    comm: bytes


GO_SECRET_EVENT = struct.Struct(f"<QQQIIII{GO_LABEL_SIZE}s{RANDOM_SIZE}s{GO_SECRET_SIZE}s"
                                f"{COMM_SIZE}s")


WAKEUP_EVERY = 128  # records per CPU between wakeups of user space (it also polls: POLL_MS)


def capture_defines(snaplen: int, ring_pages: int) -> dict[str, int]:
    return {"SNAPLEN": snaplen, "RING_PAGES": ring_pages, "WAKEUP_EVERY": WAKEUP_EVERY}


def tls_defines() -> dict[str, int]:
    return {"LIBRARY_GROUPS": LIBRARY_GROUPS, "CANDIDATES": CANDIDATES,
            "LAYOUT_SLOTS": LAYOUT_SLOTS, "ABSENT": ABSENT, "RANDOM_SIZE": RANDOM_SIZE,
            "SECRET_SIZE": SECRET_SIZE, "MASTER_KEY_SIZE": MASTER_KEY_SIZE}


def go_tls_defines() -> dict[str, int]:
    return {"GO_BUILDS": GO_BUILDS, "GO_LABEL_SIZE": GO_LABEL_SIZE,
            "GO_SECRET_SIZE": GO_SECRET_SIZE, "RANDOM_SIZE": RANDOM_SIZE}
