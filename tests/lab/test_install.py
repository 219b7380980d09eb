"""`pip install .` (not editable): the wheel carries bpf/, offsets/ and the CRI stubs, and the
installed keytap compiles its BPF and reads its offsets from inside the package."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_installed_package_captures_from_its_own_data(tmp_path: Path) -> None:
    tree = tmp_path / "src"  # a copy: building leaves build/ behind
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((REPO / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(tree)], check=True)
    wheel = next(tmp_path.glob("keytap-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"keytap/bpf/capture.c", "keytap/bpf/tls.c", "keytap/bpf/scope.h",
            "keytap/offsets/openssl.json", "keytap/k8s/cri/api_pb2_grpc.py"} <= names

    venv = tmp_path / "venv"  # as the README says: Debian's BCC through system site-packages
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    # keytap's dependencies from the test venv, keytap itself only from the wheel
    (Path(site.stdout.strip()) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                   check=True)
    installed = Path(site.stdout.strip()) / "keytap"
    output = tmp_path / "lo.pcapng"
    result = subprocess.run([str(venv / "bin" / "keytap"), "capture", "-i", "lo", "-o",
                             str(output), "--duration", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert output.is_file()
    where = subprocess.run([str(python), "-c", "from keytap.kernel.loader import BPF_SOURCE_DIR;"
                            "from keytap.tls.offsets import DEFAULT_PATH;"
                            "print(BPF_SOURCE_DIR, DEFAULT_PATH.parent)"], cwd=tmp_path,
                           check=True, capture_output=True, text=True).stdout.split()
    assert where == [str(installed / "bpf"), str(installed / "offsets")]
