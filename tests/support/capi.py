"""OpenSSL's C API through cffi, for the lab's TLS peers: the system libssl or the copy that a
`cryptography` wheel links statically. Shared by tls_client.py and tls_server.py (run as
scripts, they import it as a sibling module).
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

TLS_VERSIONS = {"1.2": 0x0303, "1.3": 0x0304}
SSL_CTRL_SET_MIN_PROTO_VERSION, SSL_CTRL_SET_MAX_PROTO_VERSION = 123, 124
SSL_FILETYPE_PEM = 1
SSL_OP_NO_TICKET = 0x4000
SSL_CTRL_SET_GROUPS_LIST = 92
NID_X9_62_PRIME256V1 = 415
# every TLS 1.3 suite; OpenSSL enables the two CCM ones only when asked
TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_CCM_SHA256",
                "TLS_AES_128_CCM_8_SHA256")
# OpenSSL 3.2+ rates CCM_8's 64-bit tag below security level 1: neither end uses it above 0
SECURITY_LEVEL_0 = b"DEFAULT:@SECLEVEL=0"  # a cipher list: the wheels have no other setter
BODY_SIZE = 64 * 1024
SYSTEM_CDEF = """
typedef ... SSL_CTX; typedef ... SSL; typedef ... SSL_METHOD;
const SSL_METHOD *TLS_client_method(void);
const SSL_METHOD *TLS_server_method(void);
SSL_CTX *SSL_CTX_new(const SSL_METHOD *);
long SSL_CTX_ctrl(SSL_CTX *, int, long, void *);
int SSL_CTX_set_ciphersuites(SSL_CTX *, const char *);
int SSL_CTX_set_cipher_list(SSL_CTX *, const char *);
int SSL_CTX_use_certificate_file(SSL_CTX *, const char *, int);
int SSL_CTX_use_PrivateKey_file(SSL_CTX *, const char *, int);
void SSL_CTX_set_keylog_callback(SSL_CTX *, void (*)(const SSL *, const char *));
SSL *SSL_new(SSL_CTX *);
void SSL_free(SSL *);
int SSL_clear(SSL *);
int SSL_set_fd(SSL *, int);
void SSL_set_connect_state(SSL *);
void SSL_set_accept_state(SSL *);
int SSL_do_handshake(SSL *);
int SSL_write(SSL *, const void *, int);
int SSL_read(SSL *, void *, int);
int SSL_shutdown(SSL *);
int SSL_get_error(const SSL *, int);
typedef ... SSL_SESSION;
SSL_SESSION *SSL_get1_session(SSL *);
int SSL_set_session(SSL *, SSL_SESSION *);
void SSL_SESSION_free(SSL_SESSION *);
int SSL_session_reused(const SSL *);
uint64_t SSL_set_options(SSL *, uint64_t);
"""


def body() -> bytes:
    """What every connection gets: deterministic, incompressible, BODY_SIZE bytes."""
    return hashlib.shake_256(b"keytap matrix body").digest(BODY_SIZE)


def response() -> bytes:
    return (b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % BODY_SIZE) + body()


@dataclass(frozen=True)
class Session:
    """One TLS configuration the lab's client and server run, and what its handshake shows.

    cipher: the suite (TLS 1.3) or cipher list (1.2) the client insists on; "" = its default.
    resume: two connections, the second resumes the first's session
    ("session-id": TLS 1.2 with tickets off; "ticket": a TLS 1.2 ticket; "psk": TLS 1.3).
    hello_retry: the server takes only P-256, which no client sends a first key share for.
    group: the group the server's hello must name ("" = not checked); both ends keep their
    library's default groups, so this checks a default (X25519MLKEM768 from 3.5 on).
    """

    tls: str
    cipher: str = ""
    resume: str = ""
    hello_retry: bool = False
    group: str = ""

    @property
    def id(self) -> str:
        return "-".join(part for part in (f"tls{self.tls}", self.cipher, self.resume,
                                          "hrr" if self.hello_retry else "", self.group) if part)

    @property
    def connections(self) -> int:
        return 2 if self.resume else 1


def sessions_to_json(sessions: Sequence[Session]) -> str:
    return json.dumps([asdict(session) for session in sessions])


def sessions_from_json(text: str) -> list[Session]:
    return [Session(**fields) for fields in json.loads(text)]


def load(which: str):
    """(ffi, lib) of the system libssl ("system", found the way the dynamic loader finds it,
    LD_LIBRARY_PATH included), of a libssl file (a path; its libcrypto beside it, loaded
    first: a wheel's libssl names it in DT_NEEDED with no RUNPATH) or of cryptography's static
    copy ("cryptography")."""
    if which != "cryptography":
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(SYSTEM_CDEF)
        if which == "system":
            return ffi, ffi.dlopen("libssl.so.3")
        libssl = Path(which)
        for crypto in libssl.parent.glob("libcrypto*.so*"):
            ffi.dlopen(str(crypto), ffi.RTLD_GLOBAL)
        return ffi, ffi.dlopen(str(libssl))
    from cryptography.hazmat.bindings.openssl.binding import Binding

    return Binding.ffi, Binding.lib


def set_versions(ffi, lib, ctx, low: int, high: int) -> None:
    """min/max protocol version with whatever this binding has."""
    if hasattr(lib, "SSL_CTX_set_min_proto_version"):  # cryptography's bindings: functions
        assert lib.SSL_CTX_set_min_proto_version(ctx, low) == 1
        assert lib.SSL_CTX_set_max_proto_version(ctx, high) == 1
    elif hasattr(lib, "SSL_CTX_ctrl"):  # macros over SSL_CTX_ctrl in OpenSSL's headers
        assert lib.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, low, ffi.NULL) == 1
        assert lib.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MAX_PROTO_VERSION, high, ffi.NULL) == 1
    else:  # the pre-1.1.0 way: switch the others off
        options = 0
        for name, version in (("SSL_OP_NO_TLSv1", 0x0301), ("SSL_OP_NO_TLSv1_1", 0x0302),
                              ("SSL_OP_NO_TLSv1_2", 0x0303), ("SSL_OP_NO_TLSv1_3", 0x0304)):
            if not low <= version <= high:
                options |= getattr(lib, name, 0)
        lib.SSL_CTX_set_options(ctx, options)



def log_keys_to(ffi, lib, ctx, path: str) -> Callable:
    """Append the library's own key-log lines to `path`: the reference keytap is held to.
    Keep the returned callback alive as long as `ctx`."""
    keylog = open(path, "a")  # noqa: SIM115 (lives as long as the callback)

    @ffi.callback(ffi.typeof(lib.SSL_CTX_set_keylog_callback).args[1])
    def on_keylog(_ssl, line) -> None:
        keylog.write(ffi.string(line).decode() + "\n")
        keylog.flush()

    lib.SSL_CTX_set_keylog_callback(ctx, on_keylog)
    return on_keylog


# --- OpenSSL before 1.1.1 (tls_legacy.py): TLS 1.2 only, no keylog callback ---------------

SSL_CTRL_SET_ECDH_AUTO = 94
SSL_CB_HANDSHAKE_DONE = 0x20
# 1.0.2 through dlopen: it has neither TLS_*_method nor the min/max protocol controls, so the
# TLS 1.2 methods pin the version; functions it lacks are never called.
LEGACY_CDEF = SYSTEM_CDEF + """
int SSL_library_init(void);
const SSL_METHOD *TLSv1_2_client_method(void);
const SSL_METHOD *TLSv1_2_server_method(void);
"""


def load_legacy(which: str):
    """(ffi, lib) of cryptography's static copy ("cryptography") or of the libssl file `which`
    (its libcrypto must be on LD_LIBRARY_PATH)."""
    if which == "cryptography":
        return load(which)
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(LEGACY_CDEF)
    lib = ffi.dlopen(which)
    lib.SSL_library_init()  # 1.0.2 registers its ciphers and digests only when asked to
    return ffi, lib


def legacy_context(ffi, lib, *, server: bool):
    """A TLS 1.2-only SSL_CTX. A 1.0.2 server offers ECDHE only once told to pick the curve
    itself (1.1.0 always does; cryptography's binding has the 1.0.2 macro as a function)."""
    ctx = lib.SSL_CTX_new(lib.TLSv1_2_server_method() if server else lib.TLSv1_2_client_method())
    if server and hasattr(lib, "SSL_CTX_set_ecdh_auto"):
        lib.SSL_CTX_set_ecdh_auto(ctx, 1)
    elif server:
        assert lib.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_ECDH_AUTO, 1, ffi.NULL) == 1
    return ctx


def log_master_secrets_to(ffi, lib, ctx, path: str) -> Callable:
    """Append, at each handshake's end, the CLIENT_RANDOM line that the library's own API
    reports (SSL_get_client_random, SSL_SESSION_get_master_key: 1.1.0 on): without a keylog
    callback, the cross-check of the peer's key log. Keep the callback alive as long as `ctx`."""
    log = open(path, "a")  # noqa: SIM115 (lives as long as the callback)

    @ffi.callback(ffi.typeof(lib.SSL_CTX_set_info_callback).args[1])
    def on_info(ssl, where: int, _ret: int) -> None:
        if where & SSL_CB_HANDSHAKE_DONE:
            random, key = ffi.new("unsigned char[32]"), ffi.new("unsigned char[48]")
            lib.SSL_get_client_random(ssl, random, 32)
            length = lib.SSL_SESSION_get_master_key(lib.SSL_get_session(ssl), key, 48)
            log.write(f"CLIENT_RANDOM {ffi.buffer(random)[:].hex()} "
                      f"{ffi.buffer(key, length)[:].hex()}\n")
            log.flush()

    lib.SSL_CTX_set_info_callback(ctx, on_info)
    return on_info


def https_get(ffi, lib, ctx, host: str, port: int, path: str, output: str, *,
              implicit: bool) -> None:
    """GET `path` over one TLS connection; the response, headers and all, is appended to
    `output`. `implicit`: no SSL_do_handshake, SSL_write does the handshake inside libssl."""
    sock = socket.create_connection((host, port))
    ssl = lib.SSL_new(ctx)
    lib.SSL_set_fd(ssl, sock.fileno())
    lib.SSL_set_connect_state(ssl)
    if not implicit:
        result = lib.SSL_do_handshake(ssl)
        assert result == 1, f"handshake failed: {lib.SSL_get_error(ssl, result)}"
    request = f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()
    assert lib.SSL_write(ssl, request, len(request)) == len(request)
    buffer = ffi.new("char[]", 65536)
    with open(output, "ab") as out:
        while (count := lib.SSL_read(ssl, buffer, 65536)) > 0:
            out.write(ffi.buffer(buffer, count)[:])
    sock.close()
