"""OpenSSL's C API through cffi, for the lab's TLS peers: the system libssl or the copy that a
`cryptography` wheel links statically. Shared by tls_client.py and tls_server.py (run as
scripts, they import it as a sibling module).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

TLS_VERSIONS = {"1.2": 0x0303, "1.3": 0x0304}
SSL_CTRL_SET_MIN_PROTO_VERSION, SSL_CTRL_SET_MAX_PROTO_VERSION = 123, 124
SSL_FILETYPE_PEM = 1
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
int SSL_set_fd(SSL *, int);
void SSL_set_connect_state(SSL *);
void SSL_set_accept_state(SSL *);
int SSL_do_handshake(SSL *);
int SSL_write(SSL *, const void *, int);
int SSL_read(SSL *, void *, int);
int SSL_shutdown(SSL *);
int SSL_get_error(const SSL *, int);
"""


def body() -> bytes:
    """What every connection gets: deterministic, incompressible, BODY_SIZE bytes."""
    return hashlib.shake_256(b"keytap matrix body").digest(BODY_SIZE)


def response() -> bytes:
    return (b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % BODY_SIZE) + body()


def load(which: str):
    """(ffi, lib) of the system libssl ("system") or of cryptography's static copy."""
    if which == "system":
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(SYSTEM_CDEF)
        return ffi, ffi.dlopen("libssl.so.3")
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
