"""An HTTPS/1.0 GET through OpenSSL's C API, from the system libssl or cryptography's static copy.

    tls_client.py --openssl {system,cryptography} [--implicit] [--tls 1.2|1.3] [--cipher NAME]
                  --keylog FILE --out FILE HOST PORT PATH

--implicit never calls SSL_do_handshake: SSL_set_connect_state, then SSL_write does the
handshake inside libssl, the path a probe on SSL_do_handshake alone would miss.
The keylog callback writes what the library itself says its secrets are: the reference.
"""

from __future__ import annotations

import argparse
import socket

import cffi

TLS_VERSIONS = {"1.2": 0x0303, "1.3": 0x0304}
SSL_CTRL_SET_MIN_PROTO_VERSION, SSL_CTRL_SET_MAX_PROTO_VERSION = 123, 124
SYSTEM_CDEF = """
typedef ... SSL_CTX; typedef ... SSL; typedef ... SSL_METHOD;
const SSL_METHOD *TLS_client_method(void);
SSL_CTX *SSL_CTX_new(const SSL_METHOD *);
long SSL_CTX_ctrl(SSL_CTX *, int, long, void *);
int SSL_CTX_set_ciphersuites(SSL_CTX *, const char *);
int SSL_CTX_set_cipher_list(SSL_CTX *, const char *);
void SSL_CTX_set_keylog_callback(SSL_CTX *, void (*)(const SSL *, const char *));
SSL *SSL_new(SSL_CTX *);
int SSL_set_fd(SSL *, int);
void SSL_set_connect_state(SSL *);
int SSL_do_handshake(SSL *);
int SSL_write(SSL *, const void *, int);
int SSL_read(SSL *, void *, int);
int SSL_get_error(const SSL *, int);
"""


def load(which: str):
    if which == "system":
        ffi = cffi.FFI()
        ffi.cdef(SYSTEM_CDEF)
        return ffi, ffi.dlopen("libssl.so.3")
    from cryptography.hazmat.bindings.openssl.binding import Binding

    return Binding.ffi, Binding.lib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--openssl", choices=("system", "cryptography"), default="system")
    parser.add_argument("--implicit", action="store_true")
    parser.add_argument("--tls", choices=tuple(TLS_VERSIONS), default="1.3")
    parser.add_argument("--cipher")
    parser.add_argument("--keylog", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    args = parser.parse_args()

    ffi, lib = load(args.openssl)
    ctx = lib.SSL_CTX_new(lib.TLS_client_method())
    version = TLS_VERSIONS[args.tls]
    if hasattr(lib, "SSL_CTX_set_max_proto_version"):  # cryptography's bindings: functions
        lib.SSL_CTX_set_min_proto_version(ctx, version)
        lib.SSL_CTX_set_max_proto_version(ctx, version)
    else:  # macros over SSL_CTX_ctrl in OpenSSL's headers
        lib.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, version, ffi.NULL)
        lib.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_MAX_PROTO_VERSION, version, ffi.NULL)
    if args.cipher and args.tls == "1.3":
        assert lib.SSL_CTX_set_ciphersuites(ctx, args.cipher.encode()) == 1
    elif args.cipher:
        assert lib.SSL_CTX_set_cipher_list(ctx, args.cipher.encode()) == 1
    keylog = open(args.keylog, "a")  # noqa: SIM115 (lives as long as the callback)

    @ffi.callback(ffi.typeof(lib.SSL_CTX_set_keylog_callback).args[1])
    def on_keylog(_ssl, line) -> None:
        keylog.write(ffi.string(line).decode() + "\n")
        keylog.flush()

    lib.SSL_CTX_set_keylog_callback(ctx, on_keylog)
    sock = socket.create_connection((args.host, args.port))
    ssl = lib.SSL_new(ctx)
    lib.SSL_set_fd(ssl, sock.fileno())
    lib.SSL_set_connect_state(ssl)
    if not args.implicit:
        result = lib.SSL_do_handshake(ssl)
        assert result == 1, f"handshake failed: {lib.SSL_get_error(ssl, result)}"
    request = f"GET {args.path} HTTP/1.0\r\nHost: {args.host}\r\n\r\n".encode()
    assert lib.SSL_write(ssl, request, len(request)) == len(request)
    buffer = ffi.new("char[]", 65536)
    with open(args.out, "wb") as out:
        while (count := lib.SSL_read(ssl, buffer, 65536)) > 0:
            out.write(ffi.buffer(buffer, count)[:])
    sock.close()


if __name__ == "__main__":
    main()
