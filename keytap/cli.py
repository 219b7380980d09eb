"""Command line: argument parsing only, with tcpdump's habits (-i, -c, -s; -o for -w)."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from keytap import __version__
from keytap.errors import BadInput, KeytapError
from keytap.kernel.abi import MAX_SNAPLEN

# Exit codes (README, "Exit codes"); with `-- CMD`, the command's own code comes first.
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2  # argparse's own code for a bad option, kept for every bad value
EXIT_UNDECRYPTABLE = 3
EXIT_DISK_FULL = 4  # the output or the key log: the capture stopped, the file is whole
EXIT_INTERFACES_GONE = 5  # every captured interface vanished (pod deleted)

MAX_SECONDS = 10 * 365 * 86400  # --duration: beyond ten years it is a typo
MAX_KEY_WAIT_S = 60.0  # a held flow costs memory; keys come within milliseconds
MAX_BUFFER_KIB = 1 << 20  # 1 GiB: the ring's size in bytes must fit the kernel's u32
MAX_FILE_MB = 1 << 30  # -C: a petabyte file is a typo
MEGABYTE = 1_000_000  # tcpdump's -C unit


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad value is one line (the usage text stays behind --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"keytap: {self.prog}: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _snaplen(text: str) -> int:
    value = int(text)
    if value == 0:
        return MAX_SNAPLEN  # tcpdump: -s 0 means "the default"
    if not 0 < value <= MAX_SNAPLEN:
        raise argparse.ArgumentTypeError(f"snaplen must be 1..{MAX_SNAPLEN} (0 = {MAX_SNAPLEN})")
    return value


def _seconds_up_to(limit: float) -> Callable[[str], float]:
    def seconds(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and 0 < value <= limit):
            raise argparse.ArgumentTypeError(
                f"must be a number of seconds above 0 and at most {limit:g}, not {text}")
        return value

    return seconds


def _megabytes(text: str) -> int:
    """-C: millions of bytes, as tcpdump counts them; fractions allowed."""
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= MAX_FILE_MB):
        raise argparse.ArgumentTypeError(f"must be a number of MB above 0 and at most "
                                         f"{MAX_FILE_MB}, not {text}")
    return max(1, int(value * MEGABYTE))


def _buffer_kib(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_BUFFER_KIB:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BUFFER_KIB} KiB (1 GiB)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="keytap",
        description="Capture packets and the TLS secrets that decrypt them into one pcapng file.")
    parser.add_argument("--version", action="version", version=f"keytap {__version__}")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    capture = commands.add_parser("capture", help="capture interfaces into a pcapng file")
    capture.add_argument("-i", "--interface", dest="interfaces", action="append",
                         metavar="IFACE",
                         help="interface to capture, or a glob pattern ('veth*': also those "
                              "that appear later) (repeat for more; default: lo)")
    capture.add_argument("--pid", dest="pids", action="append", default=[],
                         type=_positive_int, metavar="PID",
                         help="capture the pod this process is in: the host-side interfaces "
                              "of its network namespace (repeatable)")
    capture.add_argument("--netns", dest="netns", action="append", default=[],
                         metavar="NAME|PATH",
                         help="capture the host-side interfaces of this network namespace "
                              "(a name of `ip netns`, or /proc/PID/ns/net) (repeatable)")
    capture.add_argument("-o", "-w", "--output", required=True, metavar="FILE",
                         help="pcapng file to write (mode 0600); '-' for standard output")
    capture.add_argument("-C", dest="file_size", type=_megabytes, metavar="MB",
                         help="rotate: start a new file once one has MB millions of bytes "
                              "(FILE, FILE1, FILE2...)")
    capture.add_argument("-G", dest="rotate_seconds", type=_seconds_up_to(MAX_SECONDS),
                         metavar="SECONDS",
                         help="rotate: start a new file every SECONDS; FILE may hold strftime "
                              "patterns (%%Y%%m%%d-%%H%%M%%S)")
    capture.add_argument("-W", dest="file_count", type=_positive_int, metavar="COUNT",
                         help="with -C, a ring of COUNT files (FILE0..); with -G alone, stop "
                              "after COUNT files")
    capture.add_argument("-c", "--count", type=_positive_int, metavar="COUNT",
                         help="stop after writing COUNT packets")
    capture.add_argument("--duration", type=_seconds_up_to(MAX_SECONDS), metavar="SECONDS",
                         help="stop after SECONDS")
    capture.add_argument("-s", "--snaplen", type=_snaplen, default=MAX_SNAPLEN, metavar="SNAPLEN",
                         help=f"bytes to keep of each packet (default and maximum {MAX_SNAPLEN})")
    capture.add_argument("-B", "--buffer-size", type=_buffer_kib, default=64 * 1024,
                         metavar="KiB", help="kernel ring buffer size in KiB (default 65536)")
    capture.add_argument("-q", "--quiet", action="store_true",
                         help="for scripts: no live status, no notes, no summary on stderr; "
                              "warnings and errors only (--summary-json still works)")
    capture.add_argument("--marker-socket", type=Path, metavar="PATH",
                         help="bind a unix datagram socket here; each datagram "
                              "'<CLOCK_MONOTONIC ns> <text>' becomes a marker packet whose "
                              "comment is <text> (the pytest plugin marks tests with it)")
    capture.add_argument("expression", nargs="*", metavar="EXPRESSION",
                         help="a pcap-filter expression, as tcpdump's ('tcp port 443 or icmp'):"
                              " only matching packets are captured, the others counted as "
                              "filtered out. After it, `-- CMD ARGS`: run CMD once attached, "
                              "stop when it exits, exit with its code")

    demo = commands.add_parser(
        "demo", help="capture a throwaway pod's HTTPS traffic and show tshark decrypting it")
    demo.add_argument("-o", "--output", type=Path, default=Path("keytap-demo.pcapng"),
                      metavar="FILE", help="where to keep the capture (default keytap-demo.pcapng)")

    libs = commands.add_parser(
        "libs", help="list the TLS libraries keytap would instrument, and their offsets")
    target = libs.add_mutually_exclusive_group()
    target.add_argument("--pid", type=_positive_int, help="only this process")
    target.add_argument("-i", "--interface", metavar="IFACE",
                        help="processes behind this interface (default: every process)")
    libs.add_argument("--offsets", type=Path, metavar="FILE", help="offsets table to check")

    tls = capture.add_argument_group("TLS secrets")
    tls.add_argument("--keylog-file", metavar="FILE",
                     help="also write the NSS key-log lines here (mode 0600): those of the DSBs")
    tls.add_argument("--ssl-lib", dest="ssl_libraries", action="append", default=[],
                     type=Path, metavar="PATH",
                     help="instrument this TLS library or binary too (repeatable)")
    tls.add_argument("--all-processes", action="store_true",
                     help="take keys from every process, not only those behind the interfaces")
    tls.add_argument("--offsets", type=Path, metavar="FILE",
                     help="OpenSSL struct offsets table to use (format of offsets/openssl.json)")
    tls.add_argument("--key-wait", type=_seconds_up_to(MAX_KEY_WAIT_S), default=1.5,
                     metavar="SECONDS",
                     help="longest a TLS flow waits for its keys before it is written without "
                          "them (default 1.5)")
    tls.add_argument("--no-session-checks", dest="check_sessions", action="store_false",
                     help="once a library's layout is proven, write its keys without checking "
                          "each session against its own records (for benchmarks)")
    tls.add_argument("--summary-json", type=Path, metavar="FILE",
                     help="write the end-of-capture summary as JSON")
    tls.add_argument("--fail-on-undecryptable", action="store_true",
                     help="exit non-zero when a TLS session on the wire has no keys")
    tls.add_argument("--no-tls", dest="tls", action="store_false",
                     help="capture packets only, no TLS secrets")

    k8s = capture.add_argument_group("Kubernetes (asks the node's container runtime over CRI)")
    k8s.add_argument("--pod", dest="pods", action="append", default=[], metavar="NAMESPACE/NAME",
                     help="capture this pod of this node: its host-side interfaces, keys from "
                          "its processes (repeatable)")
    k8s.add_argument("--selector", dest="selectors", action="append", default=[],
                     metavar="LABEL=VALUE",
                     help="capture every pod of this node with these labels (repeatable or "
                          "comma-separated: all must hold), also those that start later")
    k8s.add_argument("--cri-socket", metavar="PATH",
                     help="the runtime's CRI socket (default: containerd's or CRI-O's usual "
                          "path)")
    return parser


class StopFlag:
    """Set by SIGINT/SIGTERM/SIGHUP (a dropped ssh session must not leave filters and lose held
    flows); the capture loop checks it between polls. While keytap runs a command, SIGTERM and
    SIGHUP go to the command instead (Ctrl-C reaches it through the terminal, as in a shell):
    keytap stops when the command ends."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.capture = None

    def __call__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        child = self.capture.child if self.capture is not None else None
        if child is None or child.poll() is not None:
            self.signal = signum
        elif signum != signal.SIGINT:  # Ctrl-C already reached the command with our group
            child.send_signal(signum)


def exit_code_of(child) -> int:
    """The command's exit code, shell style: 128 + N for death by signal N."""
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def _check_command(name: str) -> None:
    if "/" not in name:
        if shutil.which(name) is None:
            raise BadInput(f"cannot run {name}: no such command in PATH")
        return
    path = Path(name)
    if not path.exists():
        raise BadInput(f"cannot run {name}: no such file")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise BadInput(f"cannot run {name}: not an executable file")


def check_capture_args(args: argparse.Namespace, command: tuple[str, ...]) -> None:
    """Every value the parser could not check alone, before anything is attached or created."""
    from keytap.sink.files import STDOUT, check_output_path, same_file

    outputs = {"-o": args.output, "--keylog-file": args.keylog_file,
               "--summary-json": args.summary_json and str(args.summary_json)}
    given = [(option, path) for option, path in outputs.items() if path is not None]
    for option, path in given:
        if option != "-o" and path == STDOUT:
            raise BadInput(f"{option} needs a file name ('-' is only for -o)")
        check_output_path(path, option)
    for i, (option, path) in enumerate(given):
        for other, other_path in given[i + 1:]:
            if same_file(path, other_path):
                raise BadInput(f"{option} and {other} name the same file {path}: give two")
    if args.marker_socket is not None and not args.marker_socket.parent.is_dir():
        raise BadInput(f"--marker-socket {args.marker_socket}: directory "
                       f"{args.marker_socket.parent} does not exist")
    for library in args.ssl_libraries:
        if not library.is_file():
            raise BadInput(f"--ssl-lib {library}: "
                           f"{'is a directory' if library.is_dir() else 'no such file'}")
    if args.offsets is not None and not args.offsets.is_file():
        raise BadInput(f"--offsets {args.offsets}: no such file")
    _check_rotation(args)
    if command:
        _check_command(command[0])
    if args.expression:
        from keytap.kernel.pcapfilter import compile_expression, to_c

        args.packet_filter = to_c(compile_expression(" ".join(args.expression), args.snaplen))


def _check_rotation(args: argparse.Namespace) -> None:
    """-C, -G, -W: what tcpdump refuses too, and a first file name that can be written."""
    from keytap.sink.files import STDOUT, check_output_path

    if args.file_size is None and args.rotate_seconds is None:
        if args.file_count is not None:
            raise BadInput("-W needs -C or -G")
        return
    option = "-C" if args.file_size is not None else "-G"
    if args.output == STDOUT:
        raise BadInput(f"{option} rotates files: give -w FILE, not '-'")
    first = time.strftime(args.output) if args.rotate_seconds is not None else args.output
    check_output_path(first or args.output, "-w")
    if os.path.lexists(first) and not os.path.isfile(first):
        raise BadInput(f"{option} rotates regular files: {first} is not one (a device or FIFO "
                       "takes a single stream: leave out -C/-G)")


def run_capture_command(args: argparse.Namespace) -> int:
    from keytap.kernel.links import LinkFollower, is_pattern
    from keytap.kernel.loader import check_privileges
    from keytap.kernel.netns import netns_interfaces, pid_interfaces
    from keytap.merge.reorder import ReorderConfig
    from keytap.session import DISK_FULL, Capture, CaptureOptions
    from keytap.sink.files import write_private
    from keytap.sink.rotation import RotationRule

    command = tuple(args.command)
    args.packet_filter = None
    check_privileges()
    check_capture_args(args, command)
    named = args.pods or args.selectors or args.pids or args.netns
    interfaces = tuple(args.interfaces or ([] if named else ["lo"]))
    follow = None
    patterns = [name for name in interfaces if is_pattern(name)]
    if patterns:
        if args.selectors:
            raise BadInput("-i patterns and --selector both follow new interfaces: give one")
        follow = LinkFollower(patterns)
        interfaces = tuple(name for name in interfaces if name not in patterns)
        interfaces += tuple(n for n in follow.present() if n not in interfaces)
    for pid in args.pids:
        interfaces += tuple(n for n in pid_interfaces(pid) if n not in interfaces)
    for netns in args.netns:
        interfaces += tuple(n for n in netns_interfaces(netns) if n not in interfaces)
    if args.pods:
        from keytap.k8s.pods import resolve_pods

        interfaces += resolve_pods(args.pods, args.cri_socket, exclude=interfaces)
    if args.selectors:
        from keytap.k8s.pods import follow_pods

        follow, found = follow_pods(args.selectors, args.cri_socket, exclude=interfaces)
        interfaces += found
    options = CaptureOptions(
        interfaces=interfaces, command=command,
        marker_socket=args.marker_socket, output=args.output, count=args.count,
        duration_s=args.duration, snaplen=args.snaplen, ring_bytes=args.buffer_size * 1024,
        tls=args.tls, all_processes=args.all_processes,
        ssl_libraries=tuple(args.ssl_libraries), offsets_file=args.offsets,
        keylog_file=args.keylog_file, packet_filter=args.packet_filter, follow=follow,
        quiet=args.quiet,
        rotation=(RotationRule(args.output, args.file_size, args.rotate_seconds,
                               args.file_count)
                  if args.file_size is not None or args.rotate_seconds is not None else None),
        reorder=ReorderConfig(key_wait_ns=int(args.key_wait * 1e9),
                              check_sessions=args.check_sessions))
    stop = StopFlag()
    stop.install()
    capture = Capture(options, stop)
    stop.capture = capture
    capture.run()
    for line in [] if args.quiet else capture.summary_lines():
        print(f"keytap: {line}", file=sys.stderr)
    summary = capture.summary()
    if args.summary_json:
        try:
            write_private(str(args.summary_json), json.dumps(summary, indent=2) + "\n")
        except (KeytapError, OSError) as error:
            print(f"keytap: --summary-json {args.summary_json}: {error}", file=sys.stderr)
    failure = capture.output_error
    if failure is not None and failure.errno != errno.EPIPE:  # a reader that left is no error
        return EXIT_DISK_FULL if failure.errno in DISK_FULL else EXIT_ERROR
    if follow is None and all(interface.lost for interface in capture.stats.interfaces):
        return EXIT_INTERFACES_GONE
    if capture.child is not None:
        code = exit_code_of(capture.child)
        if code != 0:
            return code
    if args.fail_on_undecryptable and summary["tls"]["sessions_without_keys"]:
        print(f"keytap: {summary['tls']['sessions_without_keys']} TLS sessions have no keys "
              "(--fail-on-undecryptable)", file=sys.stderr)
        return EXIT_UNDECRYPTABLE
    return 0


def run_libs_command(args: argparse.Namespace) -> int:
    from keytap.kernel.peers import peer_netns_ids
    from keytap.tls.listing import format_reports, list_libraries
    from keytap.tls.offsets import load_offsets
    from keytap.tls.remembered import RememberedLayouts

    table = load_offsets(args.offsets)
    try:
        scope = peer_netns_ids(args.interface) if args.interface else None
    except LookupError as error:
        raise KeytapError(f"{error}: see `ip link` for the names") from None
    reports = list_libraries(scope, args.pid)
    for line in format_reports(reports, table, RememberedLayouts()):
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in words:  # keytap capture [OPTIONS] [EXPRESSION] -- CMD ARGS: whatever follows
        at = words.index("--")  # is the command's, its own options included
        words, command = words[:at], words[at + 1:]
    args = build_parser().parse_args(words)
    args.command = command
    try:
        if args.subcommand == "libs":
            return run_libs_command(args)
        if args.subcommand == "demo":
            from keytap.demo.demo import run_demo

            return run_demo(args.output.resolve())
        return run_capture_command(args)
    except KeytapError as error:
        print(f"keytap: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(error, BadInput) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
