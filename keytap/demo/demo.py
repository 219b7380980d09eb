"""`keytap demo`: the one-command proof that a capture decrypts with nothing but its own file.

It builds a throwaway pod network (keytap.demo.labnet), runs an HTTPS server in the pod (Debian's
python3, i.e. the system libssl), fetches from it with curl over TLS 1.3 and TLS 1.2 while
`keytap capture` runs on the pod's host-side veth, then asks tshark to decrypt the file (no
key file given) and prints what it shows. Everything it made is removed, also on failure.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from keytap import READY_LINE
from keytap.demo.labnet import Lab, remove_stale_labs, sh
from keytap.errors import KeytapError
from keytap.kernel.loader import check_privileges

PORT = 8443
SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = """
import http.server, ssl, sys
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from the pod, you asked for {self.path}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server = http.server.ThreadingHTTPServer((sys.argv[3], int(sys.argv[4])), Hello)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""
CLIENTS = (("TLS 1.3", ["--tlsv1.3"], "/tls13"), ("TLS 1.2", ["--tlsv1.2", "--tls-max", "1.2"],
                                                  "/tls12"))


def run_demo(output: Path, log=sys.stderr) -> int:
    check_privileges()
    for tool in ("ip", "curl", "openssl", "tshark", SYSTEM_PYTHON):
        if shutil.which(tool) is None:
            raise KeytapError(f"the demo needs {tool}: run tools/setup")
    remove_stale_labs()
    lab = Lab(index=9).create()
    workdir = Path(tempfile.mkdtemp(prefix="keytap-demo-"))
    try:
        cert, key = workdir / "cert.pem", workdir / "key.pem"
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-nodes", "-days", "1", "-subj", "/CN=keytap-demo", "-keyout", str(key), "-out",
           str(cert))
        lab.spawn(lab.pod, SYSTEM_PYTHON, "-c", SERVER, str(cert), str(key), lab.pod_ip,
                  str(PORT))
        lab.wait_for_port(lab.pod, PORT, lab.pod_ip)
        log.write(f"keytap demo: pod {lab.pod_ip} serves HTTPS; capturing its veth "
                  f"{lab.pod_veth} into {output}\n")
        capture = lab.spawn(lab.node, sys.executable, "-m", "keytap", "capture", "-i",
                            lab.pod_veth, "-o", str(output), text=True)
        _wait_until_capturing(capture)
        for name, flags, path in CLIENTS:
            log.write(f"keytap demo: curl over {name}: https://{lab.pod_ip}:{PORT}{path}\n")
            lab.run(lab.client, "curl", "-sfk", *flags, "-o", "/dev/null",
                    f"https://{lab.pod_ip}:{PORT}{path}")
        capture.send_signal(2)
        _, report = capture.communicate(timeout=60)
        log.write(report)
        if capture.returncode != 0:
            raise KeytapError(f"the capture failed (exit code {capture.returncode})")
    finally:
        lab.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    return _show_decrypted(output, log)


def _wait_until_capturing(capture: subprocess.Popen) -> None:
    assert capture.stderr is not None
    for line in capture.stderr:
        if READY_LINE in line:
            return
    capture.wait()
    raise KeytapError(f"keytap capture exited with {capture.returncode} before it started")


def _show_decrypted(output: Path, log) -> int:
    """What tshark decrypts from the file alone: the HTTP exchanges inside TLS."""
    result = sh("tshark", "-n", "-r", str(output), "-Y", "http", "-T", "fields",
                "-e", "tls.record.version", "-e", "ip.src", "-e", "http.request.method",
                "-e", "http.request.uri", "-e", "http.response.code", "-e", "http.file_data",
                check=False)
    exchanges = [line.split("\t") for line in result.stdout.splitlines()]
    log.write(f"\ntshark decrypts {output} with no key file (the keys are inside it):\n")
    for _version, source, method, uri, code, body in exchanges:
        shown = body.replace("\\n", " ").strip()  # tshark escapes the body's newline
        text = f"{method} {uri}" if method else f"{code} {shown}"
        log.write(f"  {source:>12}  {text}\n")
    answered = sum(1 for row in exchanges if row[4])
    if answered < len(CLIENTS):
        log.write(f"keytap demo: only {answered} of {len(CLIENTS)} responses decrypted\n")
        return 1
    log.write(f"\nOpen it yourself: wireshark {output}   (or: tshark -r {output} -Y http)\n")
    return 0
