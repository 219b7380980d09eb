"""An HTTPS/1.0 server through OpenSSL's C API, from the system libssl or cryptography's copy.

    tls_server.py --openssl {system,cryptography} [--tls 1.2|1.3] [--cipher NAME]
                  --cert FILE --key FILE --keylog FILE --bind IP --port N --count N

Serves body() (64 KiB of fixed bytes, with Content-Length) to each of `count` connections,
one at a time, then exits: 0 when every connection got its answer. Without --tls both 1.2
and 1.3 are allowed and the client chooses. The keylog callback appends what the library
itself says its secrets are: the reference keytap is held to.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import sys

TLS_VERSIONS = {"1.2": 0x0303, "1.3": 0x0304}
SSL_CTRL_SET_MIN_PROTO_VERSION, SSL_CTRL_SET_MAX_PROTO_VERSION = 123, 124
SSL_FILETYPE_PEM = 1
BODY_SIZE = 64 * 1024
SYSTEM_CDEF = """
typedef ... SSL_CTX; typedef ... SSL; typedef ... SSL_METHOD;
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
    import cffi

    if which == "system":
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


def serve(ffi, lib, ctx, conn: socket.socket, answer: bytes) -> str | None:
    """One connection; None when it went well, else what went wrong."""
    ssl = lib.SSL_new(ctx)
    try:
        lib.SSL_set_fd(ssl, conn.fileno())
        lib.SSL_set_accept_state(ssl)
        result = lib.SSL_do_handshake(ssl)
        if result != 1:
            return f"handshake failed: SSL_get_error {lib.SSL_get_error(ssl, result)}"
        request, buffer = b"", ffi.new("char[]", 4096)
        while b"\r\n\r\n" not in request:
            count = lib.SSL_read(ssl, buffer, 4096)
            if count <= 0:
                return f"request cut short: {request!r}"
            request += ffi.buffer(buffer, count)[:]
        written = lib.SSL_write(ssl, answer, len(answer))
        if written != len(answer):
            return f"SSL_write wrote {written} of {len(answer)} bytes"
        lib.SSL_shutdown(ssl)
        return None
    finally:
        lib.SSL_free(ssl)
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--openssl", choices=("system", "cryptography"), default="system")
    parser.add_argument("--tls", choices=tuple(TLS_VERSIONS))
    parser.add_argument("--cipher")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--keylog", required=True)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()

    ffi, lib = load(args.openssl)
    ctx = lib.SSL_CTX_new(lib.TLS_server_method())
    pinned = TLS_VERSIONS.get(args.tls)
    set_versions(ffi, lib, ctx, pinned or TLS_VERSIONS["1.2"], pinned or TLS_VERSIONS["1.3"])
    if args.cipher and args.tls == "1.3":
        assert lib.SSL_CTX_set_ciphersuites(ctx, args.cipher.encode()) == 1
    elif args.cipher:
        assert lib.SSL_CTX_set_cipher_list(ctx, args.cipher.encode()) == 1
    assert lib.SSL_CTX_use_certificate_file(ctx, args.cert.encode(), SSL_FILETYPE_PEM) == 1
    assert lib.SSL_CTX_use_PrivateKey_file(ctx, args.key.encode(), SSL_FILETYPE_PEM) == 1
    keylog = open(args.keylog, "a")  # noqa: SIM115 (lives as long as the callback)

    @ffi.callback(ffi.typeof(lib.SSL_CTX_set_keylog_callback).args[1])
    def on_keylog(_ssl, line) -> None:
        keylog.write(ffi.string(line).decode() + "\n")
        keylog.flush()

    lib.SSL_CTX_set_keylog_callback(ctx, on_keylog)
    answer, failures = response(), 0
    with socket.create_server((args.bind, args.port), backlog=args.count) as listener:
        for index in range(args.count):
            conn, peer = listener.accept()
            problem = serve(ffi, lib, ctx, conn, answer)
            if problem:
                failures += 1
                print(f"tls_server: connection {index} from {peer[0]}: {problem}",
                      file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
