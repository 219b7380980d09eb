"""A TCP relay that holds the server's first bytes back: keys then come after their hold.

Run in a lab namespace: `delay_relay.py LISTEN_IP LISTEN_PORT SERVER_IP SERVER_PORT DELAY_S`.
Each accepted connection is relayed to the server; what the server sends first reaches the
client DELAY_S later (there is no sch_netem on the build machine). Prints "ready" once
listening.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time


def pump(source: socket.socket, target: socket.socket, delay_s: float) -> None:
    first = True
    try:
        while data := source.recv(65536):
            if first and delay_s:
                time.sleep(delay_s)
            first = False
            target.sendall(data)
    except OSError:
        pass
    finally:
        for each in (source, target):
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)


def serve(listen: tuple[str, int], server: tuple[str, int], delay_s: float) -> None:
    listener = socket.create_server(listen)
    print("ready", flush=True)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(server)
        threading.Thread(target=pump, args=(client, upstream, 0.0), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, delay_s), daemon=True).start()


if __name__ == "__main__":
    listen_ip, listen_port, server_ip, server_port, delay = sys.argv[1:6]
    serve((listen_ip, int(listen_port)), (server_ip, int(server_port)), float(delay))
