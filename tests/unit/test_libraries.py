"""keytap.tls.libraries against real OpenSSL builds and small synthetic look-alikes.

Oracles are independent of the code under test: OpenSSL's own answer at run time (ssl module,
cryptography's backend, ctypes), pyelftools' plain symbol lookup, and compilers for fakes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import ssl
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from keytap.tls.libraries import (
    CALL_SYMBOLS,
    Flavor,
    Linkage,
    TlsLibrary,
    decode_version_function,
    decode_version_number,
    inspect_library,
    resolve_in_root,
)

SYSTEM_LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
SYSTEM_LIBSSL = SYSTEM_LIBDIR / "libssl.so.3"
SYSTEM_LIBCRYPTO = SYSTEM_LIBDIR / "libcrypto.so.3"

# cryptography wheel -> (extension module that carries OpenSSL, OpenSSL version inside)
WHEELS = {
    "3.4.8": ("_openssl.abi3.so", "1.1.1l"),
    "38.0.4": ("_openssl.abi3.so", "3.0.7"),
    "41.0.7": ("_rust.abi3.so", "3.1.4"),
    "42.0.8": ("_rust.abi3.so", "3.2.2"),
    "43.0.3": ("_rust.abi3.so", "3.3.2"),
    "44.0.3": ("_rust.abi3.so", "3.4.1"),
    "45.0.7": ("_rust.abi3.so", "3.5.2"),
    "50.0.2": ("_rust.abi3.so", "4.0.3"),
}


def runtime_version(banner: str) -> str:
    """ "OpenSSL 3.0.19 27 Jan 2026" -> "3.0.19" (OpenSSL's own answer, from running it)."""
    return banner.split()[1]


def vaddr_offsets(path: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (vaddr, file offset) the slow, obvious way, with pyelftools' own lookup."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        result = {}
        for table_name in (".dynsym", ".symtab"):
            table = elf.get_section_by_name(table_name)
            if table is None:
                continue
            for name in names:
                for sym in table.get_symbol_by_name(name) or []:
                    if name in result or sym["st_shndx"] == "SHN_UNDEF":
                        continue
                    vaddr = sym["st_value"]
                    seg = next(
                        s for s in loads if s["p_vaddr"] <= vaddr < s["p_vaddr"] + s["p_filesz"]
                    )
                    result[name] = (vaddr, vaddr - seg["p_vaddr"] + seg["p_offset"])
        return result


# --- version numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (0x101010CF, "1.1.1l"),  # cryptography 3.4.8's OpenSSL_version_num()
        (0x1010117F, "1.1.1w"),
        (0x1000215F, "1.0.2u"),
        (0x1000221F, None),  # past "z": left to the banner
        (0x0090819F, "0.9.8y"),
        (0x10100000, "1.1.0-dev"),
        (0x30000130, "3.0.19"),  # Debian 12's libcrypto.so.3
        (0x30000070, "3.0.7"),
        (0x30500020, "3.5.2"),
        (0x40000030, "4.0.3"),
        (0x20000000, None),  # LibreSSL's fixed OPENSSL_VERSION_NUMBER
    ],
)
def test_decode_version_number(number: int, expected: str | None) -> None:
    assert decode_version_number(number) == expected


@pytest.mark.parametrize(
    ("code", "machine", "expected"),
    [
        (bytes.fromhex("b830010030c3"), "EM_X86_64", 0x30000130),
        (bytes.fromhex("f30f1efab8cf101010c3"), "EM_X86_64", 0x101010CF),  # endbr64 first
        (bytes.fromhex("554889e5b8300000405dc3"), "EM_X86_64", 0x40000030),  # -O0 frame
        (bytes.fromhex("b830010030c3"), "EM_386", 0x30000130),
        (bytes.fromhex("4883ec08e8000000"), "EM_X86_64", None),  # not a constant
        # bytes from the aarch64 wheels of cryptography 3.4.8 and 50.0.2
        (bytes.fromhex("e01982d20002a2f2c0035fd61f2003d5"), "EM_AARCH64", 0x101010CF),
        (bytes.fromhex("000680d20000a8f2c0035fd61f2003d5"), "EM_AARCH64", 0x40000030),
        (struct.pack("<3I", 0xD503245F, 0xD2A40000, 0xD65F03C0), "EM_AARCH64", 0x20000000),
        (bytes.fromhex("b830010030c3"), "EM_RISCV", None),
    ],
)
def test_decode_version_function(code: bytes, machine: str, expected: int | None) -> None:
    assert decode_version_function(code, machine) == expected


# --- the system's OpenSSL --------------------------------------------------------------------


def test_system_libssl_is_dynamic_openssl_with_libcrypto_version() -> None:
    lib = inspect_library(SYSTEM_LIBSSL)

    assert lib is not None
    assert lib.flavor is Flavor.OPENSSL
    assert lib.linkage is Linkage.DYNAMIC
    assert lib.version == runtime_version(ssl.OPENSSL_VERSION)  # 3.0.19 on Debian 12 today
    assert lib.display_path == str(SYSTEM_LIBSSL)
    assert lib.crypto_path is not None and lib.crypto_path.samefile(SYSTEM_LIBCRYPTO)
    assert set(lib.symbols) == {"SSL_do_handshake", *CALL_SYMBOLS, "SSL_get_version"}
    assert set(lib.crypto_symbols) == {"EVP_PKEY_derive"}
    assert lib.missing_symbols == ()
    assert lib.build_id is not None and len(lib.build_id) == 40
    assert lib.crypto_build_id is not None and lib.crypto_build_id != lib.build_id


def test_system_version_matches_openssl_version_num_at_run_time() -> None:
    libcrypto = ctypes.CDLL(str(SYSTEM_LIBCRYPTO))
    libcrypto.OpenSSL_version_num.restype = ctypes.c_ulong
    lib = inspect_library(SYSTEM_LIBSSL)
    assert lib is not None
    assert lib.version == decode_version_number(libcrypto.OpenSSL_version_num())


def test_system_offsets_are_where_the_loaded_code_is() -> None:
    """A uprobe offset is the file offset backing the function's address in a live process."""
    libssl = ctypes.CDLL(str(SYSTEM_LIBSSL))  # already mapped here through `import ssl`
    libcrypto = ctypes.CDLL(str(SYSTEM_LIBCRYPTO))
    lib = inspect_library(SYSTEM_LIBSSL)
    assert lib is not None

    targets = lib.uprobe_targets()
    assert set(targets) == {"SSL_do_handshake", *CALL_SYMBOLS, "SSL_get_version", "EVP_PKEY_derive"}
    for name, target in targets.items():
        handle = libcrypto if name == "EVP_PKEY_derive" else libssl
        address = ctypes.cast(getattr(handle, name), ctypes.c_void_p).value
        path, offset = file_offset_of_address(address)
        assert Path(path).samefile(target.path), name
        assert offset == target.offset, name


def file_offset_of_address(address: int) -> tuple[str, int]:
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip(), address - start + int(fields[2], 16)
    raise AssertionError(f"{address:#x} is not mapped")


def test_libcrypto_alone_is_not_a_tls_library() -> None:
    assert inspect_library(SYSTEM_LIBCRYPTO) is None


def test_files_without_openssl_are_none(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("SSL_do_handshake\n")
    assert inspect_library(text) is None
    assert inspect_library(Path(sys.executable).resolve()) is None  # python: no OpenSSL inside
    assert inspect_library(SYSTEM_LIBDIR / "libc.so.6") is None
    with pytest.raises(OSError):
        inspect_library(tmp_path / "missing.so")


# --- cryptography's statically linked OpenSSL -------------------------------------------------


def venv_cryptography_module() -> Path:
    import cryptography.hazmat.bindings._rust as rust

    return Path(rust.__file__)


def test_venv_cryptography_is_static_openssl() -> None:
    from cryptography import __version__
    from cryptography.hazmat.backends.openssl import backend

    path = venv_cryptography_module()
    started = time.perf_counter()
    lib = inspect_library(path)
    elapsed = time.perf_counter() - started

    assert lib is not None
    assert lib.flavor is Flavor.OPENSSL
    assert lib.linkage is Linkage.STATIC
    assert lib.version == runtime_version(backend.openssl_version_text())
    if __version__ in WHEELS:
        assert lib.version == WHEELS[__version__][1]
    assert lib.crypto_path is None
    assert set(lib.symbols) == {
        "SSL_do_handshake", *CALL_SYMBOLS, "SSL_get_version", "EVP_PKEY_derive"}
    assert elapsed < 1.0, f"inspecting {path} ({path.stat().st_size} bytes) took {elapsed:.2f}s"


def test_venv_cryptography_offsets_are_translated_through_pt_load() -> None:
    """Its text segment's vaddr and file offset differ, so a vaddr would be a wrong uprobe."""
    path = venv_cryptography_module()
    lib = inspect_library(path)
    assert lib is not None
    expected = vaddr_offsets(path, list(lib.symbols))
    assert {name: off for name, (_, off) in expected.items()} == dict(lib.symbols)
    if any(vaddr != off for vaddr, off in expected.values()):
        return  # the translation was exercised
    pytest.fail("no symbol has vaddr != file offset; this build does not test the translation")


# --- synthetic libraries (compiled here) ------------------------------------------------------

CC = shutil.which("cc") or shutil.which("gcc")

LIBCRYPTO_C = """
const char *OpenSSL_version(int t) { return t ? "x" : BANNER; }
unsigned long OpenSSL_version_num(void) { return NUMBER; }
int EVP_PKEY_derive(void *c, unsigned char *k, unsigned long *l) { return c != 0; }
"""
LIBSSL_C = """
int EVP_PKEY_derive(void *c, unsigned char *k, unsigned long *l);
int SSL_do_handshake(void *s) { return EVP_PKEY_derive(s, 0, 0); }
int SSL_read(void *s, void *b, int n) { return s != 0; }
int SSL_write(void *s, const void *b, int n) { return s != 0; }
void SSL_free(void *s) { }
const char *SSL_get_version(const void *s) { return "TLSv1.3"; }
"""
BORINGSSL_C = """
int BORINGSSL_self_test(void) { return 1; }
"""


def compile_so(out: Path, source: str, *flags: str, soname: str | None = None) -> Path:
    if CC is None:
        pytest.skip("no C compiler to build synthetic TLS libraries")
    src = out.with_suffix(".c")
    src.write_text(source)
    cmd = [CC, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), *flags]
    if soname:
        cmd.append(f"-Wl,-soname,{soname}")
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def fake_pair(directory: Path, banner: str, number: int, *cflags: str, so: str = "3",
              libssl_c: str = LIBSSL_C) -> Path:
    """libssl.so.N + libcrypto.so.N in `directory`, libssl needing libcrypto; returns libssl."""
    directory.mkdir(parents=True, exist_ok=True)
    defines = [f'-DBANNER="{banner}"', f"-DNUMBER={number:#x}UL", *cflags]
    compile_so(directory / f"libcrypto.so.{so}", LIBCRYPTO_C, *defines, soname=f"libcrypto.so.{so}")
    return compile_so(
        directory / f"libssl.so.{so}",
        libssl_c,
        f"-L{directory}",
        f"-l:libcrypto.so.{so}",
        soname=f"libssl.so.{so}",
    )


def test_dynamic_openssl_1_1_with_endbr64(tmp_path: Path) -> None:
    libssl = fake_pair(
        tmp_path, "OpenSSL 1.1.1l  24 Aug 2021", 0x101010CF, "-fcf-protection=full", so="1.1"
    )

    lib = inspect_library(libssl)

    assert lib is not None
    assert (lib.flavor, lib.version, lib.linkage) == (Flavor.OPENSSL, "1.1.1l", Linkage.DYNAMIC)
    assert lib.crypto_path == tmp_path / "libcrypto.so.1.1"
    assert lib.crypto_display_path == str(tmp_path / "libcrypto.so.1.1")
    assert set(lib.crypto_symbols) == {"EVP_PKEY_derive"}
    assert vaddr_offsets(libssl, list(lib.symbols)).keys() == lib.symbols.keys()


def test_secrets_are_read_after_io_calls_whichever_the_build_has(tmp_path: Path) -> None:
    """1.0.2 has no SSL_read_ex/SSL_write_ex: the plain forms and SSL_free suffice."""
    libssl = fake_pair(tmp_path, "OpenSSL 1.0.2r  26 Feb 2019", 0x1000212F, so="1.0.0")
    lib = inspect_library(libssl)
    assert lib is not None
    assert (lib.version, lib.call_symbols, lib.missing_symbols) == (
        "1.0.2r", ("SSL_read", "SSL_write", "SSL_free"), ())
    without_free = fake_pair(tmp_path / "nofree", "OpenSSL 3.0.9  30 May 2023", 0x30000090,
                             libssl_c=LIBSSL_C.replace("void SSL_free(void *s) { }\n", ""))
    lib = inspect_library(without_free)
    assert lib is not None and lib.missing_symbols == ("SSL_free",)


def test_version_falls_back_to_the_banner(tmp_path: Path) -> None:
    libssl = fake_pair(tmp_path, "OpenSSL 3.0.2 15 Mar 2022", 0, "-DOpenSSL_version_num=renamed")
    lib = inspect_library(libssl)
    assert lib is not None
    assert (lib.flavor, lib.version) == (Flavor.OPENSSL, "3.0.2")


def test_unknown_version(tmp_path: Path) -> None:
    libssl = fake_pair(tmp_path, "none", 0, "-DOpenSSL_version_num=renamed")
    lib = inspect_library(libssl)
    assert lib is not None
    assert (lib.flavor, lib.version) == (Flavor.OPENSSL, None)


def test_libressl(tmp_path: Path) -> None:
    libssl = fake_pair(tmp_path, "LibreSSL 3.8.2", 0x20000000)
    lib = inspect_library(libssl)
    assert lib is not None
    assert (lib.flavor, lib.version, lib.linkage) == (Flavor.LIBRESSL, "3.8.2", Linkage.DYNAMIC)


def test_libressl_without_banner_is_recognised_by_its_number(tmp_path: Path) -> None:
    libssl = fake_pair(tmp_path, "none", 0x20000000)
    lib = inspect_library(libssl)
    assert lib is not None
    assert (lib.flavor, lib.version) == (Flavor.LIBRESSL, None)


def test_static_boringssl(tmp_path: Path) -> None:
    path = compile_so(
        tmp_path / "libboring_app.so",
        LIBCRYPTO_C + LIBSSL_C + BORINGSSL_C,
        '-DBANNER="BoringSSL"',
        "-DNUMBER=0x1010107fUL",
    )
    lib = inspect_library(path)
    assert lib is not None
    assert (lib.flavor, lib.version, lib.linkage) == (Flavor.BORINGSSL, None, Linkage.STATIC)
    assert lib.missing_symbols == ()


def test_a_file_that_only_imports_ssl_is_not_tls(tmp_path: Path) -> None:
    fake_pair(tmp_path, "OpenSSL 3.0.2 15 Mar 2022", 0x30000020)
    user = compile_so(
        tmp_path / "_ssl_user.so",
        "int SSL_do_handshake(void *s);\nint go(void *s) { return SSL_do_handshake(s); }\n",
        f"-L{tmp_path}",
        "-l:libssl.so.3",
    )
    assert inspect_library(user) is None


def test_libcrypto_is_resolved_inside_the_process_root(tmp_path: Path) -> None:
    """Under /proc/PID/root, DT_NEEDED is looked up in that root, following its own symlinks."""
    root = tmp_path / "root"
    libdir = root / "usr" / "lib"
    fake_pair(tmp_path / "build", "OpenSSL 3.2.1 30 Jan 2024", 0x30200010)
    libdir.mkdir(parents=True)
    (tmp_path / "build" / "libssl.so.3").rename(libdir / "libssl.so.3")
    (tmp_path / "build" / "libcrypto.so.3").rename(libdir / "libcrypto.so.3.2.1")
    # absolute symlink: must resolve to root/usr/lib/..., not the host's /usr/lib/...
    (libdir / "libcrypto.so.3").symlink_to("/usr/lib/libcrypto.so.3.2.1")

    assert resolve_in_root(root, "/usr/lib/libcrypto.so.3") == libdir / "libcrypto.so.3.2.1"
    assert resolve_in_root(root, "/usr/lib/../lib/./libssl.so.3") == libdir / "libssl.so.3"
    assert resolve_in_root(root, "/usr/lib/nothing") is None

    # inspect_library infers the root from a /proc/PID/root prefix; a process of ours whose
    # root is / stands in for it, so point it at our tree through a resolver instead.
    seen: list[str] = []

    def resolver(name: str) -> tuple[Path, str] | None:
        seen.append(name)
        real = resolve_in_root(root, f"/usr/lib/{name}")
        return None if real is None else (real, f"/usr/lib/{name}")

    lib = inspect_library(libdir / "libssl.so.3", "/usr/lib/libssl.so.3", resolve_needed=resolver)
    assert seen == ["libcrypto.so.3"]
    assert lib is not None
    assert lib.version == "3.2.1"
    assert lib.crypto_path == libdir / "libcrypto.so.3.2.1"
    assert lib.crypto_display_path == "/usr/lib/libcrypto.so.3"


def test_proc_root_paths_get_display_paths() -> None:
    own_root = f"/proc/{os.getpid()}/root"
    lib = inspect_library(Path(own_root + str(SYSTEM_LIBSSL)))
    assert lib is not None
    assert lib.display_path == str(SYSTEM_LIBSSL)
    assert str(lib.crypto_path).startswith(own_root + "/")
    assert lib.crypto_display_path == str(SYSTEM_LIBCRYPTO)


def test_tls_library_is_immutable_and_hashable() -> None:
    lib = inspect_library(SYSTEM_LIBSSL)
    assert isinstance(lib, TlsLibrary)
    with pytest.raises(TypeError):
        lib.symbols["SSL_do_handshake"] = 0  # type: ignore[index]
    assert hash(lib) == hash(inspect_library(SYSTEM_LIBSSL))


# --- the full wheel matrix (downloads from PyPI) ---------------------------------------------


@pytest.fixture(scope="session")
def wheel_dir() -> Path:
    """cryptography wheels for x86_64 Linux, downloaded once into a cache kept between runs."""
    cache = Path(
        os.environ.get("KEYTAP_TEST_WHEELS", Path.home() / ".cache" / "keytap-test-wheels")
    )
    cache.mkdir(parents=True, exist_ok=True)
    for version in WHEELS:
        if any(cache.glob(f"cryptography-{version}-*.whl")):
            continue
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary", ":all:", "--platform", "manylinux2014_x86_64",
            "--python-version", "3.11", "--dest", str(cache), f"cryptography=={version}",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not any(cache.glob(f"cryptography-{version}-*.whl")):
            pytest.fail(
                f"could not download cryptography=={version} from PyPI into {cache} "
                f"(needed to test OpenSSL version detection): {done.stderr.strip()[-800:]}"
            )
    return cache


@pytest.mark.lab
@pytest.mark.parametrize(("version", "module", "expected"), [(v, *m) for v, m in WHEELS.items()])
def test_wheel_matrix(
    wheel_dir: Path, tmp_path: Path, version: str, module: str, expected: str
) -> None:
    wheel = next(wheel_dir.glob(f"cryptography-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = f"cryptography/hazmat/bindings/{module}"
        path = Path(archive.extract(member, tmp_path))

    started = time.perf_counter()
    lib = inspect_library(path)
    elapsed = time.perf_counter() - started

    assert lib is not None
    assert (lib.flavor, lib.version, lib.linkage) == (Flavor.OPENSSL, expected, Linkage.STATIC)
    assert lib.missing_symbols == ()
    expected_offsets = vaddr_offsets(path, list(lib.symbols))
    assert {name: off for name, (_, off) in expected_offsets.items()} == dict(lib.symbols)
    assert elapsed < 1.0, f"{path.stat().st_size} bytes took {elapsed:.2f}s"
