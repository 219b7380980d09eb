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
import socket
import sys

from capi import SSL_FILETYPE_PEM, TLS_VERSIONS, load, log_keys_to, response, set_versions


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
    _callback = log_keys_to(ffi, lib, ctx, args.keylog)  # referenced while ctx lives
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
