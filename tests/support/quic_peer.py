"""QUIC exchanges, then TLS-over-TCP exchanges, all through one OpenSSL 3.5+ libssl file.

    quic_peer.py --libssl FILE --quic-keylog FILE --tls-keylog FILE [--quic N] [--tls N]
                 serve --cert FILE --key FILE --bind IP --port N
    quic_peer.py --libssl FILE --quic-keylog FILE --tls-keylog FILE [--quic N] [--tls N]
                 fetch HOST PORT

`serve` answers N QUIC connections (UDP PORT, through a listener: the 3.5 server API), then N
TLS connections (TCP PORT, listening from the start), one at a time, and exits 0. `fetch` makes
them and fails unless every answer is response(): the exchanges really happened. Each request
and answer is one stream. The keylog callbacks write what the library itself says its secrets
are, QUIC's and TLS's apart. Run as a script: capi and tls_server are sibling modules.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from capi import SSL_FILETYPE_PEM, SYSTEM_CDEF, log_keys_to, response
from tls_server import serve as serve_tls

QUIC_CDEF = """
const SSL_METHOD *OSSL_QUIC_client_method(void);
const SSL_METHOD *OSSL_QUIC_server_method(void);
int SSL_set_alpn_protos(SSL *, const unsigned char *, unsigned int);
void SSL_CTX_set_alpn_select_cb(SSL_CTX *, int (*)(SSL *, const unsigned char **,
    unsigned char *, const unsigned char *, unsigned int, void *), void *);
SSL *SSL_new_listener(SSL_CTX *, uint64_t);
int SSL_listen(SSL *);
SSL *SSL_accept_connection(SSL *, uint64_t);
SSL *SSL_new_stream(SSL *, uint64_t);
int SSL_in_init(const SSL *);
int SSL_read_ex(SSL *, void *, size_t, size_t *);
int SSL_write_ex2(SSL *, const void *, size_t, uint64_t, size_t *);
"""
ALPN = b"\x08http/1.0"  # QUIC requires ALPN; the protocol name does not matter here
SSL_WRITE_FLAG_CONCLUDE = 1  # the write ends the stream (QUIC FIN)
SSL_TLSEXT_ERR_OK = 0
REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def load(libssl: Path):
    """(ffi, lib) of `libssl`. Its libcrypto is loaded first: the wheel's libssl names it in
    DT_NEEDED but has no RUNPATH to find it by."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(SYSTEM_CDEF + QUIC_CDEF)
    (crypto,) = libssl.parent.glob("libcrypto-*.so.3")
    ffi.dlopen(str(crypto), ffi.RTLD_GLOBAL)
    return ffi, ffi.dlopen(str(libssl))


def ask_in_init(lib, *objects) -> None:
    """SSL_in_init on QUIC objects, as applications call it (from an info callback, around
    SSL_read): keytap's probe then meets connection, stream and listener objects, type != 0."""
    for quic_object in objects:
        assert lib.SSL_in_init(quic_object) == 0, "handshake not finished"


def read_all(ffi, lib, ssl) -> bytes:
    """Everything the peer sends until it ends the stream (QUIC FIN, TLS close or EOF)."""
    data, buffer, count = b"", ffi.new("char[]", 65536), ffi.new("size_t *")
    while lib.SSL_read_ex(ssl, buffer, 65536, count) == 1:
        data += ffi.buffer(buffer, count[0])[:]
    return data


def write_all(ffi, lib, ssl, data: bytes, flags: int = 0) -> None:
    written = ffi.new("size_t *")
    assert lib.SSL_write_ex2(ssl, data, len(data), flags, written) == 1, "SSL_write_ex2 failed"
    assert written[0] == len(data)


def shut_down(lib, ssl) -> None:
    """Blocking QUIC shutdown returns 1 once the connection is closed."""
    while lib.SSL_shutdown(ssl) == 0:
        pass


def select_first_alpn(ffi, lib, ctx):
    """Accept whatever protocol the client offers first; keep the callback alive with ctx."""

    @ffi.callback(ffi.typeof(lib.SSL_CTX_set_alpn_select_cb).args[1])
    def select(_ssl, out, out_length, offered, _offered_length, _arg) -> int:
        out[0], out_length[0] = offered + 1, offered[0]
        return SSL_TLSEXT_ERR_OK

    lib.SSL_CTX_set_alpn_select_cb(ctx, select, ffi.NULL)
    return select


def server_ctx(lib, method, cert: str, key: str):
    ctx = lib.SSL_CTX_new(method)
    assert lib.SSL_CTX_use_certificate_file(ctx, cert.encode(), SSL_FILETYPE_PEM) == 1
    assert lib.SSL_CTX_use_PrivateKey_file(ctx, key.encode(), SSL_FILETYPE_PEM) == 1
    return ctx


def serve_quic(ffi, lib, listener) -> None:
    """One connection: its first stream carries the request, the answer goes back on it."""
    connection = lib.SSL_accept_connection(listener, 0)
    assert connection != ffi.NULL, "SSL_accept_connection failed"
    request = read_all(ffi, lib, connection)  # an accepted connection ends its handshake here
    ask_in_init(lib, listener, connection)
    assert request == REQUEST, request
    write_all(ffi, lib, connection, response(), SSL_WRITE_FLAG_CONCLUDE)
    shut_down(lib, connection)
    lib.SSL_free(connection)


def serve(ffi, lib, args: argparse.Namespace) -> None:
    quic_ctx = server_ctx(lib, lib.OSSL_QUIC_server_method(), args.cert, args.key)
    tls_ctx = server_ctx(lib, lib.TLS_server_method(), args.cert, args.key)
    _callbacks = (log_keys_to(ffi, lib, quic_ctx, args.quic_keylog),  # alive while the ctxs
                  log_keys_to(ffi, lib, tls_ctx, args.tls_keylog),
                  select_first_alpn(ffi, lib, quic_ctx))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((args.bind, args.port))
    udp.setblocking(False)  # OpenSSL's QUIC does its own blocking, with poll
    # bound before listening: once the TCP port is seen listening, QUIC packets are queued
    with socket.create_server((args.bind, args.port)) as tcp:
        listener = lib.SSL_new_listener(quic_ctx, 0)
        assert listener != ffi.NULL and lib.SSL_set_fd(listener, udp.fileno()) == 1
        assert lib.SSL_listen(listener) == 1
        for _ in range(args.quic):
            serve_quic(ffi, lib, listener)
        lib.SSL_free(listener)
        for _ in range(args.tls):
            connection, _ = tcp.accept()
            problem = serve_tls(ffi, lib, tls_ctx, connection, response())
            assert problem is None, problem


def fetch_quic(ffi, lib, ctx, host: str, port: int) -> bytes:
    """One connection, the request on a stream object of its own."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect((host, port))  # OpenSSL takes the initial peer address from the socket
    udp.setblocking(False)
    ssl = lib.SSL_new(ctx)
    assert lib.SSL_set_fd(ssl, udp.fileno()) == 1
    assert lib.SSL_set_alpn_protos(ssl, ALPN, len(ALPN)) == 0
    result = lib.SSL_do_handshake(ssl)
    assert result == 1, f"QUIC handshake failed: SSL_get_error {lib.SSL_get_error(ssl, result)}"
    stream = lib.SSL_new_stream(ssl, 0)
    assert stream != ffi.NULL, "SSL_new_stream failed"
    ask_in_init(lib, ssl, stream)
    write_all(ffi, lib, stream, REQUEST, SSL_WRITE_FLAG_CONCLUDE)
    answer = read_all(ffi, lib, stream)
    lib.SSL_free(stream)
    shut_down(lib, ssl)
    lib.SSL_free(ssl)
    udp.close()
    return answer


def fetch_tls(ffi, lib, ctx, host: str, port: int) -> bytes:
    with socket.create_connection((host, port)) as tcp:
        ssl = lib.SSL_new(ctx)
        lib.SSL_set_fd(ssl, tcp.fileno())
        lib.SSL_set_connect_state(ssl)
        result = lib.SSL_do_handshake(ssl)
        assert result == 1, f"TLS handshake failed: SSL_get_error {lib.SSL_get_error(ssl, result)}"
        write_all(ffi, lib, ssl, REQUEST)
        answer = read_all(ffi, lib, ssl)
        lib.SSL_free(ssl)
    return answer


def fetch(ffi, lib, args: argparse.Namespace) -> None:
    quic_ctx = lib.SSL_CTX_new(lib.OSSL_QUIC_client_method())
    tls_ctx = lib.SSL_CTX_new(lib.TLS_client_method())
    _callbacks = (log_keys_to(ffi, lib, quic_ctx, args.quic_keylog),  # alive while the ctxs
                  log_keys_to(ffi, lib, tls_ctx, args.tls_keylog))
    for _ in range(args.quic):
        answer = fetch_quic(ffi, lib, quic_ctx, args.host, args.port)
        assert answer == response(), f"QUIC: {len(answer)} bytes, not the server's answer"
    for _ in range(args.tls):
        answer = fetch_tls(ffi, lib, tls_ctx, args.host, args.port)
        assert answer == response(), f"TLS: {len(answer)} bytes, not the server's answer"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--libssl", type=Path, required=True)
    parser.add_argument("--quic-keylog", required=True)
    parser.add_argument("--tls-keylog", required=True)
    parser.add_argument("--quic", type=int, default=1, help="QUIC connections")
    parser.add_argument("--tls", type=int, default=1, help="TLS-over-TCP connections, after")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve")
    for option in ("--cert", "--key", "--bind"):
        server.add_argument(option, required=True)
    server.add_argument("--port", type=int, required=True)
    client = commands.add_parser("fetch")
    client.add_argument("host")
    client.add_argument("port", type=int)
    args = parser.parse_args()
    ffi, lib = load(args.libssl)
    (serve if args.command == "serve" else fetch)(ffi, lib, args)


if __name__ == "__main__":
    main()
