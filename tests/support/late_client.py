"""A long-lived HTTPS client: handshakes at once, asks only after a pause.

    late_client.py HOST PORT KEYLOG PAUSE_S OUT_PREFIX TLS_VERSION...

One connection per TLS version ("1.2", "1.3"), all handshaken first; then PAUSE_S seconds of
quiet; then a GET / on each, whose body goes to OUT_PREFIX-<index>. keytap probes its libssl
only during the pause, so the keys it reads come after their flows were written.
"""

from __future__ import annotations

import socket
import ssl
import sys
import time

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def main() -> None:
    host, port, keylog, pause, out = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
    connections = []
    for version in sys.argv[6:]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.minimum_version = context.maximum_version = VERSIONS[version]
        context.keylog_filename = keylog
        connections.append(context.wrap_socket(socket.create_connection((host, port))))
    time.sleep(float(pause))
    for index, tls in enumerate(connections):
        tls.sendall(f"GET /index.html HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
        with open(f"{out}-{index}", "wb") as body:
            body.write(response.partition(b"\r\n\r\n")[2])
        tls.close()


if __name__ == "__main__":
    main()
