"""keytap.kernel.uprobes: a uprobe link hands its cookie to the program, on entry and return,
and closing the link detaches the probe (nothing of it stays in the kernel)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from keytap.kernel import uprobes
from keytap.kernel.loader import configure_bcc_headers, import_bcc

PROGRAM = b"""
#include <uapi/linux/ptrace.h>
BPF_ARRAY(hits, u64, 8);
int count(struct pt_regs *ctx)
{
    u32 cookie = bpf_get_attach_cookie(ctx);
    if (cookie < 8)
        hits.increment(cookie);
    return 0;
}
"""
CALLS = 1000


def libc_path() -> Path:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return Path(next(line.split()[-1] for line in maps if "/libc.so" in line))


def call_getpid() -> None:
    subprocess.run([sys.executable, "-c", f"import os\nfor _ in range({CALLS}): os.getpid()"],
                   check=True)


def test_cookies_reach_the_program_and_closing_detaches() -> None:
    configure_bcc_headers()
    bcc = import_bcc()
    bpf = bcc.BPF(text=PROGRAM)
    try:
        program = bpf.load_func(b"count", bcc.BPF.KPROBE).fd
        links = uprobes.Links()
        links.attach(libc_path(), 3, [uprobes.Probe(program, "getpid")])
        links.attach(libc_path(), 5, [uprobes.Probe(program, "getpid", retprobe=True)])
        call_getpid()
        hits = {key.value: value.value for key, value in bpf[b"hits"].items() if value.value}
        assert set(hits) == {3, 5} and hits[3] == hits[5] >= CALLS, hits
        links.close()
        call_getpid()
        after = {key.value: value.value for key, value in bpf[b"hits"].items() if value.value}
        assert after == hits  # detached: no more hits
    finally:
        bpf.cleanup()


def test_a_symbol_the_file_lacks_is_an_oserror_naming_it() -> None:
    configure_bcc_headers()
    bcc = import_bcc()
    bpf = bcc.BPF(text=PROGRAM)
    try:
        program = bpf.load_func(b"count", bcc.BPF.KPROBE).fd
        links = uprobes.Links()
        try:
            links.attach(libc_path(), 1, [uprobes.Probe(program, "no_such_symbol_here")])
        except OSError as error:
            assert "no_such_symbol_here" in str(error)
        else:
            raise AssertionError("attached to a symbol libc does not have")
        links.close()
    finally:
        bpf.cleanup()
