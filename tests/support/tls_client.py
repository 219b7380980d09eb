"""HTTPS/1.0 GETs through OpenSSL's C API, from the system libssl or cryptography's static copy.

    tls_client.py --openssl {system,cryptography} [--implicit] [--one-ssl] --sessions JSON
                  --keylog FILE --out FILE HOST PORT PATH

Runs each session of the JSON list (capi.Session fields) in turn, one process for all: a
session with `resume` connects twice, the second time offering the first connection's
SSL_SESSION, and fails unless the server resumed it. Every response, headers and all, is
appended to --out.

--implicit never calls SSL_do_handshake: SSL_set_connect_state, then SSL_write does the
handshake inside libssl, the path a probe on SSL_do_handshake alone would miss.
--one-ssl makes every connection on one SSL object, SSL_clear between them (sessions of one
configuration; the system libssl only: cryptography's binding has no SSL_clear): new secrets
in an SSL whose earlier ones keytap has read.
The keylog callback writes what the library itself says its secrets are: the reference.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable

from capi import (
    SECURITY_LEVEL_0,
    SSL_OP_NO_TICKET,
    TLS_VERSIONS,
    Session,
    load,
    log_keys_to,
    sessions_from_json,
    set_versions,
)


class Client:
    """One library, one key log, one server: connections as sessions ask."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.ffi, self.lib = load(args.openssl)
        self.args = args
        self.request = f"GET {args.path} HTTP/1.0\r\nHost: {args.host}\r\n\r\n".encode()
        self.callbacks: list[Callable] = []  # referenced while their SSL_CTX lives
        self.kept = None  # --one-ssl: the SSL (and its SSL_CTX) every connection uses

    def context(self, session: Session):
        """An SSL_CTX per session: the binding can pin version and suite only there."""
        ffi, lib = self.ffi, self.lib
        ctx = lib.SSL_CTX_new(lib.TLS_client_method())
        version = TLS_VERSIONS[session.tls]
        set_versions(ffi, lib, ctx, version, version)
        if session.cipher and session.tls == "1.3":
            assert lib.SSL_CTX_set_ciphersuites(ctx, session.cipher.encode()) == 1
            assert lib.SSL_CTX_set_cipher_list(ctx, SECURITY_LEVEL_0) == 1
        elif session.cipher:
            assert lib.SSL_CTX_set_cipher_list(ctx, session.cipher.encode()) == 1
        self.callbacks.append(log_keys_to(ffi, lib, ctx, self.args.keylog))
        return ctx

    def run(self, session: Session) -> bytes:
        """The session's connections (two to resume); their responses, concatenated."""
        ctx = self.kept[1] if self.kept else self.context(session)
        answer, saved = self.connect(ctx, session, None)
        if session.resume:
            answer += self.connect(ctx, session, saved)[0]
        return answer

    def connect(self, ctx, session: Session, saved) -> tuple[bytes, object]:
        """One GET; the response and the connection's SSL_SESSION, taken after the whole
        response was read (TLS 1.3 tickets arrive after the handshake) and after
        SSL_shutdown (OpenSSL makes a session that ends without close_notify unresumable)."""
        lib = self.lib
        sock = socket.create_connection((self.args.host, self.args.port))
        if self.args.one_ssl and self.kept is None:
            self.kept = lib.SSL_new(ctx), ctx
        ssl = self.kept[0] if self.kept else lib.SSL_new(ctx)
        try:
            lib.SSL_set_fd(ssl, sock.fileno())
            lib.SSL_set_connect_state(ssl)
            if session.resume == "session-id":  # no ticket: the server's cache must resume it
                lib.SSL_set_options(ssl, SSL_OP_NO_TICKET)
            if saved is not None:
                assert lib.SSL_set_session(ssl, saved) == 1
            if not self.args.implicit:
                result = lib.SSL_do_handshake(ssl)
                assert result == 1, f"handshake failed: {lib.SSL_get_error(ssl, result)}"
            assert lib.SSL_write(ssl, self.request, len(self.request)) == len(self.request)
            answer = self.read_all(ssl)
            if saved is not None:
                assert_resumed(lib, ssl, session)
            lib.SSL_shutdown(ssl)  # the server has gone: the alert's write may fail
            return answer, lib.SSL_get1_session(ssl)
        finally:
            if self.kept:
                assert lib.SSL_clear(ssl) == 1
            else:
                lib.SSL_free(ssl)
            sock.close()

    def read_all(self, ssl) -> bytes:
        buffer, answer = self.ffi.new("char[]", 65536), b""
        while (count := self.lib.SSL_read(ssl, buffer, 65536)) > 0:
            answer += self.ffi.buffer(buffer, count)[:]
        return answer


def assert_resumed(lib, ssl, session: Session) -> None:
    """cryptography 41.0.7's binding has no SSL_session_reused (nor SSL_ctrl under it): there
    the test's wire check (no Certificate message) is the only judge."""
    if hasattr(lib, "SSL_session_reused"):
        assert lib.SSL_session_reused(ssl) == 1, f"{session.id}: the server did not resume"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--openssl", default="system",
                        help="system, cryptography, or the path of a libssl file")
    parser.add_argument("--implicit", action="store_true")
    parser.add_argument("--one-ssl", action="store_true")
    parser.add_argument("--sessions", type=sessions_from_json, required=True)
    parser.add_argument("--keylog", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    args = parser.parse_args()

    client = Client(args)
    with open(args.out, "wb") as out:
        for session in args.sessions:
            out.write(client.run(session))


if __name__ == "__main__":
    main()
