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

from capi import TLS_VERSIONS, load, log_keys_to, set_versions


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
    set_versions(ffi, lib, ctx, version, version)
    if args.cipher and args.tls == "1.3":
        assert lib.SSL_CTX_set_ciphersuites(ctx, args.cipher.encode()) == 1
    elif args.cipher:
        assert lib.SSL_CTX_set_cipher_list(ctx, args.cipher.encode()) == 1
    _callback = log_keys_to(ffi, lib, ctx, args.keylog)  # referenced while ctx lives
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
