"""Soak keytap under mixed load and show its memory and open fds over time (on demand).

Not a test (tests/lab/test_soak.py runs one minute of the same load). Needs root, BCC, iperf3;
builds the lab network and removes it when done, also on Ctrl-C:

    sudo .venv/bin/python tools/soak.py [--minutes 10] [--interval 10]

The load (tests/support/soak.py), all at once into the pod: bulk TCP at 20 Mbit/s, 64-byte UDP
at 2 Mbit/s, a new HTTPS connection every 0.1 s. keytap captures the pod's veth into a file
in the temporary directory. Printed: keytap's VmRSS, RssAnon and open fds per sample, the
growth of RssAnon and fds after the first tenth (warm-up), and the capture's accounting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import benchlib

sys.path.insert(0, str(benchlib.REPO))  # tests.support: the load the lab test uses too

from keytap.demo.labnet import Lab
from tests.support import soak
from tests.support.tls_lab import read_keylog


def main() -> int:
    parser = benchlib.argument_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=10, help="how long (default 10)")
    parser.add_argument("--interval", type=float, default=10,
                        help="seconds between samples (default 10)")
    benchlib.add_dir_argument(parser)
    args = parser.parse_args()
    if args.minutes <= 0 or args.interval <= 0:
        parser.error("--minutes and --interval must be positive")
    benchlib.preflight("soak", ("ip", "iperf3", "openssl"))
    failed: list[str] = []

    def body(lab: Lab, directory: Path) -> None:
        soak.start_servers(lab, directory)
        log, summary = directory / "keytap.stderr", directory / "summary.json"
        process = benchlib.spawn_keytap(lab, log, "-o", str(directory / "soak.pcapng"),
                                        "--keylog-file", str(directory / "keys"),
                                        "--summary-json", str(summary))
        benchlib.wait_until_capturing(process, log)
        result = soak.run_load(lab, directory, process.pid, args.minutes * 60, args.interval)
        if not benchlib.stop(process):
            failed.append("keytap did not stop on SIGINT")
            return
        print(f"{'s':>7} {'VmRSS MB':>9} {'RssAnon MB':>11} {'fds':>5}")
        for s in result.samples:
            print(f"{s.at_s:7.0f} {s.rss_kb / 1024:9.1f} {s.rss_anon_kb / 1024:11.1f} {s.fds:5}")
        report = json.loads(summary.read_text())
        packets, tls = report["packets"], report["tls"]
        keys_match = read_keylog(directory / "keys") == read_keylog(directory / "client.keys")
        print(f"RssAnon growth after warm-up {result.growth_kb('rss_anon_kb', 0.1) / 1024:.1f} "
              f"MB, fds {result.growth_kb('fds', 0.1):+d}; max RssAnon "
              f"{max(s.rss_anon_kb for s in result.samples) / 1024:.1f} MB")
        exact = packets["seen"] == packets["written"] + packets["dropped"] + packets["filtered"]
        print(f"packets seen {packets['seen']} = written {packets['written']} + dropped "
              f"{packets['dropped']} + filtered {packets['filtered']}: "
              f"{'exact' if exact else 'DOES NOT ADD UP'}")
        print(f"HTTPS connections {result.connections}, TLS sessions seen {tls['sessions_seen']}, "
              f"with keys {tls['sessions_with_keys']}; key log equals the client's: {keys_match}")

    interrupted = benchlib.in_lab("soak", args.dir, body)
    for reason in failed:
        print(f"soak: {reason}", file=sys.stderr)
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
