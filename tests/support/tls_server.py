"""An HTTPS/1.0 server through OpenSSL's C API, from the system libssl or cryptography's copy.

    tls_server.py --openssl {system,cryptography} --sessions JSON
                  --cert FILE --key FILE --keylog FILE --bind IP --port N

Serves body() (64 KiB of fixed bytes, with Content-Length) to the connections of the JSON
list of sessions (capi.Session fields, the list tls_client.py gets), one at a time and in
that order, then exits: 0 when every connection got its answer. TLS 1.2 and 1.3 and every
TLS 1.3 suite are allowed, the client chooses. One SSL_CTX serves all connections, so that
its session cache and ticket keys resume what it served before; a hello_retry session gets a
second one that accepts P-256 only. The keylog callback appends what the library itself says
its secrets are: the reference keytap is held to.
"""

from __future__ import annotations

import argparse
import socket
import sys

from capi import (
    NID_X9_62_PRIME256V1,
    SECURITY_LEVEL_0,
    SSL_CTRL_SET_GROUPS_LIST,
    SSL_FILETYPE_PEM,
    TLS13_SUITES,
    TLS_VERSIONS,
    load,
    log_keys_to,
    response,
    sessions_from_json,
    set_versions,
)


def accept_only_p256(ffi, lib, ctx) -> None:
    """With what the binding offers. The system libssl: SSL_CTX_ctrl, which OpenSSL's
    SSL_CTX_set1_groups_list macro calls. cryptography's wheels have no groups call, but
    SSL_CTX_set_tmp_ecdh, which from 1.1.0 on makes the key's curve the only group."""
    if hasattr(lib, "SSL_CTX_ctrl"):
        assert lib.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0,
                                ffi.new("char[]", b"P-256")) == 1
    else:
        key = lib.EC_KEY_new_by_curve_name(NID_X9_62_PRIME256V1)
        assert lib.SSL_CTX_set_tmp_ecdh(ctx, key) == 1
        lib.EC_KEY_free(key)


def context(ffi, lib, args: argparse.Namespace, *, p256_only: bool):
    """Every version and suite the client may ask for (CCM_8 needs security level 0)."""
    ctx = lib.SSL_CTX_new(lib.TLS_server_method())
    set_versions(ffi, lib, ctx, TLS_VERSIONS["1.2"], TLS_VERSIONS["1.3"])
    assert lib.SSL_CTX_set_ciphersuites(ctx, ":".join(TLS13_SUITES).encode()) == 1
    assert lib.SSL_CTX_set_cipher_list(ctx, SECURITY_LEVEL_0) == 1
    assert lib.SSL_CTX_use_certificate_file(ctx, args.cert.encode(), SSL_FILETYPE_PEM) == 1
    assert lib.SSL_CTX_use_PrivateKey_file(ctx, args.key.encode(), SSL_FILETYPE_PEM) == 1
    if p256_only:
        accept_only_p256(ffi, lib, ctx)
    return ctx


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
    parser.add_argument("--sessions", type=sessions_from_json, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--keylog", required=True)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    ffi, lib = load(args.openssl)
    contexts = {p256_only: context(ffi, lib, args, p256_only=p256_only)
                for p256_only in {session.hello_retry for session in args.sessions}}
    _callbacks = [log_keys_to(ffi, lib, ctx, args.keylog)  # referenced while contexts live
                  for ctx in contexts.values()]
    plan = [session for session in args.sessions for _ in range(session.connections)]
    answer, failures = response(), 0
    with socket.create_server((args.bind, args.port), backlog=len(plan)) as listener:
        for index, session in enumerate(plan):
            conn, peer = listener.accept()
            problem = serve(ffi, lib, contexts[session.hello_retry], conn, answer)
            if problem:
                failures += 1
                print(f"tls_server: connection {index} ({session.id}) from {peer[0]}: "
                      f"{problem}", file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
