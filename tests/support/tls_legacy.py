"""TLS 1.2 through the C API of an OpenSSL older than 1.1.1: cryptography's static copy, or a
libssl file (1.0.2) loaded with cffi.

    tls_legacy.py --openssl {cryptography,LIBSSL} [--master-secrets FILE] hold
    tls_legacy.py ... client [--implicit] --cipher NAME --out FILE HOST PORT PATH
    tls_legacy.py ... server --cert FILE --key FILE [--cert FILE --key FILE] --bind IP
                             --port N --count N

hold only keeps the library mapped, until killed, so that keytap finds it before the first
short-lived client. The client appends the response to --out; with --implicit it never calls
SSL_do_handshake (SSL_write does the handshake inside libssl). The server takes an RSA and an
ECDSA certificate at once (OpenSSL picks one per cipher suite), serves body() to `count`
connections and exits, 0 when all went well. These releases have no keylog callback;
--master-secrets logs what the library's own API reports at each handshake's end (1.1.0 on).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

from capi import (
    SSL_FILETYPE_PEM,
    https_get,
    legacy_context,
    load_legacy,
    log_master_secrets_to,
    response,
)
from tls_server import serve


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--openssl", required=True)
    parser.add_argument("--master-secrets")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("hold")
    client = commands.add_parser("client")
    client.add_argument("--implicit", action="store_true")
    client.add_argument("--cipher", required=True)
    client.add_argument("--out", required=True)
    client.add_argument("host")
    client.add_argument("port", type=int)
    client.add_argument("path")
    server = commands.add_parser("server")
    server.add_argument("--cert", action="append", required=True)
    server.add_argument("--key", action="append", required=True)
    server.add_argument("--bind", required=True)
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--count", type=int, required=True)
    return parser.parse_args()


def serve_all(ffi, lib, ctx, args: argparse.Namespace) -> int:
    """Each of `count` connections in turn; the number that failed (each said on stderr)."""
    failures = 0
    with socket.create_server((args.bind, args.port), backlog=args.count) as listener:
        for index in range(args.count):
            conn, peer = listener.accept()
            if problem := serve(ffi, lib, ctx, conn, response()):
                failures += 1
                print(f"tls_legacy: connection {index} from {peer[0]}: {problem}",
                      file=sys.stderr, flush=True)
    return failures


def main() -> int:
    args = arguments()
    ffi, lib = load_legacy(args.openssl)
    if args.command == "hold":
        signal.pause()  # until killed
        return 0
    ctx = legacy_context(ffi, lib, server=args.command == "server")
    if args.master_secrets:
        _callback = log_master_secrets_to(ffi, lib, ctx, args.master_secrets)  # kept alive
    if args.command == "client":
        assert lib.SSL_CTX_set_cipher_list(ctx, args.cipher.encode()) == 1
        https_get(ffi, lib, ctx, args.host, args.port, args.path, args.out,
                  implicit=args.implicit)
        return 0
    for cert, key in zip(args.cert, args.key, strict=True):
        assert lib.SSL_CTX_use_certificate_file(ctx, cert.encode(), SSL_FILETYPE_PEM) == 1
        assert lib.SSL_CTX_use_PrivateKey_file(ctx, key.encode(), SSL_FILETYPE_PEM) == 1
    return 1 if serve_all(ffi, lib, ctx, args) else 0


if __name__ == "__main__":
    sys.exit(main())
