"""keytap.kernel.uprobes: a uprobe link hands its cookie to the program, on entry and return,
and closing the link detaches the probe (nothing of it stays in the kernel)."""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from keytap.kernel import uprobes
from keytap.kernel.loader import configure_bcc_headers, import_bcc

PROGRAM = b"""
#include <uapi/linux/ptrace.h>
BPF_ARRAY(hits, u64, 8);
static __always_inline int count(struct pt_regs *ctx)
{
    u32 cookie = bpf_get_attach_cookie(ctx);
    if (cookie < 8)
        hits.increment(cookie);
    return 0;
}
int count_multi(struct pt_regs *ctx) { return count(ctx); }
int count_perf(struct pt_regs *ctx) { return count(ctx); }
"""
CALLS = 1000
Loaded = tuple[Any, uprobes.Program]  # a BCC object, and one of its programs


def libc_path() -> Path:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return Path(next(line.split()[-1] for line in maps if "/libc.so" in line))


def call_both() -> None:
    subprocess.run([sys.executable, "-c",
                    f"import os\nfor _ in range({CALLS}): os.getpid(), os.getppid()"],
                   check=True)


@pytest.fixture(params=["multi", "perf"])
def counter(request: pytest.FixtureRequest) -> Iterator[Loaded]:
    """The program above, loaded for one kind of link (uprobe_multi, as keytap loads it
    on this kernel, and perf-event links, as on kernels before 6.6): its BCC object, and it."""
    configure_bcc_headers()
    bcc = import_bcc()
    bpf = bcc.BPF(text=PROGRAM)
    try:
        if request.param == "multi":
            program = uprobes.load(bpf, "count_multi")
            assert program.multi, "this kernel (6.6+) takes uprobe_multi links"
        else:
            program = uprobes.Program(bpf.load_func(b"count_perf", bcc.BPF.KPROBE).fd, False)
        yield bpf, program
    finally:
        bpf.cleanup()


def hits(bpf: Any) -> dict[int, int]:
    return {key.value: value.value for key, value in bpf[b"hits"].items() if value.value}


def offset_of(path: Path, symbol: str) -> int:
    """A function's file offset, by pyelftools (the dynamic symbol table and the segments)."""
    with path.open("rb") as stream:
        elf = ELFFile(stream)
        address = elf.get_section_by_name(".dynsym").get_symbol_by_name(symbol)[0]["st_value"]
        for segment in elf.iter_segments("PT_LOAD"):
            if segment["p_vaddr"] <= address < segment["p_vaddr"] + segment["p_filesz"]:
                return segment["p_offset"] + address - segment["p_vaddr"]
    raise AssertionError(f"{symbol} is in no PT_LOAD of {path}")


def test_cookies_reach_the_program_and_closing_detaches(counter: Loaded) -> None:
    bpf, program = counter
    libc = libc_path()
    getpid, getppid = offset_of(libc, "getpid"), offset_of(libc, "getppid")
    links = uprobes.Links()
    links.attach(libc, 3, [uprobes.Probe(program, getpid), uprobes.Probe(program, getppid)])
    links.attach(libc, 5, [uprobes.Probe(program, getpid, retprobe=True)])
    call_both()
    before = hits(bpf)
    assert set(before) == {3, 5} and before[3] >= before[5] + CALLS, before  # getppid too
    assert before[5] >= CALLS, before
    links.close()
    call_both()
    assert hits(bpf) == before  # detached: no more hits


def test_an_offset_past_the_file_is_an_oserror(counter: Loaded) -> None:
    _bpf, program = counter
    libc = libc_path()
    links = uprobes.Links()
    with pytest.raises(OSError) as refused:
        links.attach(libc, 1, [uprobes.Probe(program, libc.stat().st_size + 4096)])
    assert refused.value.errno == errno.EINVAL
    links.close()
