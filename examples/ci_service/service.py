"""A tiny HTTPS JSON service: the kind of thing an integration-test suite talks to.

    /usr/bin/python3 service.py

It makes itself a throwaway self-signed certificate, listens on a free port of 127.0.0.1 and
prints its URL as the first line of its standard output, then serves:

    GET  /health  -> {"status": "ok"}
    GET  /items   -> the items
    POST /items   -> the JSON body back, with an id
"""

from __future__ import annotations

import json
import ssl
import subprocess
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ITEMS = [{"id": 1, "name": "apple"}, {"id": 2, "name": "pear"}]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health":
            self.reply(200, {"status": "ok"})
        elif self.path == "/items":
            self.reply(200, ITEMS)
        else:
            self.reply(404, {"error": f"no such path {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/items":
            self.reply(404, {"error": f"no such path {self.path}"})
            return
        item = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.reply(201, {"id": len(ITEMS) + 1, **item})

    def reply(self, status: int, document: object) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def tls_context() -> ssl.SSLContext:
    """A self-signed certificate made now; it only has to exist for the run."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as directory:
        cert, key = Path(directory, "cert.pem"), Path(directory, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
        context.load_cert_chain(cert, key)
    return context


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = tls_context().wrap_socket(server.socket, server_side=True)
    print(f"https://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
