"""Issue 2: bad input gets one clear line, a non-zero exit, nothing attached, no file made."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from keytap.demo.labnet import Lab
from tests.support.runner import keytap_command


def run_keytap(lab: Lab, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return lab.run(lab.node, *prefix, *keytap_command(*args), check=False, timeout=120)


def assert_clean_failure(lab: Lab, result: subprocess.CompletedProcess, output: Path,
                         expected: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keytap: "), result.stderr
    assert expected in lines[0]
    assert not output.exists()
    shown = lab.run(lab.node, "tc", "filter", "show", "dev", lab.pod_veth, "ingress").stdout
    assert "keytap" not in shown


def test_unknown_interface(lab: Lab, tmp_path: Path) -> None:
    output = tmp_path / "x.pcapng"
    result = run_keytap(lab, "capture", "-i", lab.pod_veth, "-i", "nosuch0", "-o", str(output))
    assert_clean_failure(lab, result, output, "no such interface 'nosuch0'")


@pytest.mark.parametrize("where", ["missing-dir/x.pcapng", "dir-as-output"])
def test_unwritable_output(lab: Lab, tmp_path: Path, where: str) -> None:
    output = tmp_path / where
    if where == "dir-as-output":
        output.mkdir()
    result = run_keytap(lab, "capture", "-i", lab.pod_veth, "-o", str(output))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "keytap: " in result.stderr and str(output) in result.stderr
    assert not (tmp_path / "missing-dir").exists()


def test_not_root(lab: Lab, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    output = tmp_path / "x.pcapng"
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    result = run_keytap(lab, "capture", "-i", lab.pod_veth, "-o", str(output), prefix=nobody)
    assert_clean_failure(lab, result, output, "run it with sudo")


def _run_with_patched(lab: Lab, patch: str, output: Path) -> subprocess.CompletedProcess:
    code = f"import sys; {patch}; from keytap.cli import main; sys.exit(main(sys.argv[1:]))"
    return lab.run(lab.node, sys.executable, "-c", code, "capture", "-i", lab.pod_veth,
                   "-o", str(output), check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


@pytest.mark.parametrize(
    ("patch", "advice"),
    [
        ("from pathlib import Path; import keytap.kernel.headers as k; "
         "k.SOURCES_DIR = k.MODULES_DIR = Path('/nonexistent')",
         "install them with: apt-get install linux-headers"),
        ("sys.modules['bcc'] = None; import keytap.kernel.loader as b; "
         "b.DEBIAN_DIST_PACKAGES = '/nonexistent'",
         "apt-get install python3-bpfcc"),
    ],
    ids=["kernel_headers_missing", "bcc_missing"],
)
def test_missing_dependency(lab: Lab, tmp_path: Path, patch: str, advice: str) -> None:
    output = tmp_path / "x.pcapng"
    result = _run_with_patched(lab, patch, output)
    assert_clean_failure(lab, result, output, advice)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [(["--duration", "nan"], "--duration"), (["-B", "99999999"], "-B"),
     (["--marker-socket", "/nonexistent-dir/m.sock"], "--marker-socket"),
     (["--summary-json", "/nonexistent-dir/s.json"], "/nonexistent-dir/s.json")],
    ids=["duration_nan", "huge_buffer", "marker_socket_dir", "summary_json_dir"])
def test_bad_value_exit_2_before_attaching(lab: Lab, tmp_path: Path, extra: list[str],
                                           expected: str) -> None:
    """Issue 14: found before attaching (no filter, no output file), one line, exit 2."""
    output = tmp_path / "x.pcapng"
    result = run_keytap(lab, "capture", "-i", lab.pod_veth, "-o", str(output), *extra)
    assert result.returncode == 2
    assert_clean_failure(lab, result, output, expected)
