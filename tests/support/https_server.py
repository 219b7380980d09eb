"""A Python `ssl` HTTPS/1.0 server for a directory, writing its own key log (the reference).

    https_server.py --cert PEM --key PEM --keylog FILE [--tls 1.2|1.3] [--cipher NAME]
                    --bind IP --port N DIRECTORY
"""

from __future__ import annotations

import argparse
import functools
import ssl
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--keylog", required=True)
    parser.add_argument("--tls", choices=tuple(VERSIONS))
    parser.add_argument("--cipher", help="TLS 1.2 cipher list (1.3 suites are the client's pick)")
    parser.add_argument("--bind", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("directory")
    args = parser.parse_args()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.keylog_filename = args.keylog
    if args.tls:
        context.minimum_version = context.maximum_version = VERSIONS[args.tls]
    if args.cipher:
        context.set_ciphers(args.cipher)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=args.directory)
    server = ThreadingHTTPServer((args.bind, args.port), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
