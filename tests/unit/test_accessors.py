"""keytap.tls.accessors: struct offsets read from an OpenSSL build's accessor machine code.

The byte strings are whole functions copied out of real builds (each one's origin is noted
beside it) and run at their own addresses; calls and jumps to code that is not included
are opaque, like calls into another library.  A few hand-assembled functions check that
ambiguous code yields nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keytap.tls.accessors import (
    CodeImage,
    derive_from_code,
    derive_offsets,
    layout_value,
    mismatches,
)
from keytap.tls.offsets import OffsetTable

# cryptography 3.4.8 manylinux_2_24 x86_64 wheel, _openssl.abi3.so (static OpenSSL 1.1.1l,
# functions from .symtab): s->s3 is a pointer; SSL_get_*_random inline their memcpy.
OPENSSL_111L = {
    "SSL_version": (0xE3A10, "8b07c3"),
    "SSL_is_server": (0xE5470, "8b4738c3"),
    "SSL_get_session": (0xEA830, "488b8710050000c3"),
    "SSL_SESSION_get0_cipher": (0xEBF20, "488b87f0010000c3"),
    "SSL_CIPHER_get_id": (0xDE0A0, "8b4718c3"),
    "SSL_SESSION_get_master_key": (
        0xE40F0,
        "4885d2534889f87427483950084889d34889f7480f465808488d70504889dae8ccb1f7ff4889d85bc3"
        "0f1f8000000000488b5f084889d85bc3",
    ),
    "SSL_get_client_random": (
        0xE3F50,
        "4885d2b8200000007506f3c30f1f40004883fa20488bbfa8000000480f46c283f80889c2488d8fb8"
        "0000007253488b97b800000048891689c2488b7c11f848897c16f8488d7e084883e7f84829fe8d1430"
        "4829f183e2f883fa0872ae89d631d283e6f84189d083c2084e8b0c0139f24e890c0772eef3c3660f1f"
        "840000000000a804752c85d274820fb6bfb8000000f6c20240883e0f846fffffff0fb74c11fe66894c"
        "16fec3662e0f1f8400000000008bbfb8000000893e8b4c11fc894c16fcc3",
    ),
    "SSL_get_server_random": (
        0xE4020,
        "4885d2b8200000007506f3c30f1f40004883fa20488bbfa8000000480f46c283f80889c2488d8f98"
        "0000007253488b979800000048891689c2488b7c11f848897c16f8488d7e084883e7f84829fe8d1430"
        "4829f183e2f883fa0872ae89d631d283e6f84189d083c2084e8b0c0139f24e890c0772eef3c3660f1f"
        "840000000000a804752c85d274820fb6bf98000000f6c20240883e0f846fffffff0fb74c11fe66894c"
        "16fec3662e0f1f8400000000008bbf98000000893e8b4c11fc894c16fcc3",
    ),
    "SSL_stateless": (
        0xE7860,
        "534889fbe8f7cfffff85c075035bc390e85b3b0a00488b83a80000004889df48810800080000e875d5"
        "ffff488b93a8000000488122fff7ffff85c07e0f8b9330070000b80100000085d275c183bbe0040000"
        "01b8ffffffff75b34889dfe84e07010085c00f95c00fb6c0f7d85bc3",
    ),
}

# cryptography 45.0.7 manylinux_2_34 x86_64 wheel, _rust.abi3.so (static OpenSSL 3.5.2):
# SSL_CONNECTION_FROM_SSL first (type at 0; QUIC objects go through a call).
OPENSSL_352 = {
    "SSL_version": (
        0x3441A0,
        "4885ff741b8b0785c0740da880752131c0c3660f1f4400008b4748c30f1f40008b0425000000000f0b"
        "0f1f80000000004883ec1848897c2408e8e2320200488b7c24084889c2b8010000008b0f83c18083f9"
        "0176084885d274088b42484883c418c331c0ebf7",
    ),
    "SSL_is_server": (
        0x345DB0,
        "4885ff743b8b0785c0741da88074314883ec08e8f81602004885c074138b40784883c408c30f1f008b"
        "4778c30f1f400031c04883c408c3660f1f84000000000031c0c3",
    ),
    "SSL_get_session": (
        0x34EEA0,
        "4885ff744b8b0785c07425a88074414883ec08e8088601004885c07423488b80000900004883c408c3"
        "0f1f8000000000488b8700090000c30f1f84000000000031c04883c408c3660f1f84000000000031c0"
        "c3",
    ),
}

# Debian experimental libssl4 4.0.3-1 amd64, libssl.so.4 (.dynsym): endbr64, zeroed
# registers before ret, and a memcpy that also has a (dead) 64-byte block loop.
_RANDOM_403 = (
    "f30f1efa4885ff0f84330100004883ec188b0785c07427a8800f8489000000488934244889542408e8"
    "{call}488b3424488b5424084885c04889c7746ab8200000004885d2744a4839c24c8d87{disp}480f"
    "46c289c283f8407363a8200f85fb000000a8100f852b010000a8080f8543010000a8040f8553010000"
    "85c074110fb697{disp}8816a8020f85bc0000004883c41831d231c931f631ff4531c0c3660f1f4400"
    "0031c04883c41831d231c931f631ff4531c0c3660f1f44000089c2488d0c164c01c2f30f6f42c00f11"
    "41c0f30f6f42d00f1141d0f30f6f42e00f1141e0f30f6f42f08d50ff0f1141f083fa40729d83e2c031"
    "ff89f983c740f3410f6f1c08f3410f6f540810f3410f6f4c0820f3410f6f4408300f111c0e0f11540e"
    "100f114c0e200f11440e3039d772c9e95cffffff662e0f1f84000000000031c031d231c931f631ff45"
    "31c0c389c2410fb74c10fe66894c16fee932fffffff3410f6f00488d4c1620498d5410200f1106f341"
    "0f6f40100f114610f30f6f42c00f1141c0f30f6f42d00f1141d0e9fffeffff0f1f440000f3410f6f00"
    "0f1106f3410f6f4410f00f114416f0e9e1feffff0f1f8000000000498b0848890e498b4c10f848894c"
    "16f8e9c5feffff0f1f00418b08890e418b4c10fc894c16fce9affeffff"
)
DEBIAN_403 = {
    "SSL_get_client_random": (0x4FBF0, _RANDOM_403.format(call="03ce0300", disp="88010000")),
    "SSL_get_server_random": (0x4FDE0, _RANDOM_403.format(call="13cc0300", disp="68010000")),
    "SSL_stateless": (
        0x536B0,
        "f30f1efa4885ff74068b0f85c9741131c031d231c931ffc30f1f840000000000534889fbe8a72dffff"
        "85c0750b5b31d231c931ffc30f1f00e8531efdff4889df48818b6001000000080000e8a0a9ffff4881"
        "a360010000fff7ffff85c07e0f8b93380b0000b80100000085d275bfb8ffffffff83bbd00800000175"
        "b14889dfe8dca207005bf7d819c031d231c931ffc3",
    ),
    "SSL_version": (
        0x4EF10,
        "f30f1efa4885ff74278b0785c074112580000000752a31d231c931ffc30f1f008b474831d231c931ff"
        "c3660f1f4400008b0425000000000f0b0f1f80000000004883ec1848897c2408e8c2da0300488b7c24"
        "084889c1b8010000008b1783c28083fa0176084885c9740e8b41484883c41831d231c931ffc331c048"
        "83c41831d231c931ffc3",
    ),
}

# Debian 12 libssl3 3.0.x amd64 (.dynsym): memcpy through the PLT, -fzero-call-used-regs.
DEBIAN_30_MASTER_KEY = (
    0x38300,
    "534889f8488b5f084885d274164839d34889f7488d7050480f47da4889dae8cd7bfeff4889d85b31d2"
    "31f631ffc3",
)


def image(functions: dict[str, tuple[int, str]]) -> tuple[CodeImage, dict[str, int]]:
    code = CodeImage((addr, bytes.fromhex(hexcode)) for addr, hexcode in functions.values())
    return code, {name: addr for name, (addr, _) in functions.items()}


def derive(functions: dict[str, tuple[int, str]]) -> dict[str, int | bool]:
    return derive_from_code(*image(functions))


@pytest.fixture(scope="module")
def table() -> OffsetTable:
    return OffsetTable.load()


def test_openssl_111_pointer_s3_and_session(table: OffsetTable) -> None:
    derived = derive(OPENSSL_111L)
    assert derived == {
        "ssl_version": 0,
        "server": 56,
        "session": 1296,
        "s3_is_pointer": True,
        "s3": 168,
        "s3_client_random": 184,
        "s3_server_random": 152,
        "session_master_key_length": 8,
        "session_master_key": 80,
        "session_cipher": 496,
        "cipher_id": 24,
    }
    layout = table.lookup("1.1.1l")
    assert layout is not None and mismatches(derived, layout) == []
    same_minor = {h: lay for h, lay in table.layouts.items() if lay.s3_is_pointer}
    # 1.1.1j..w share one layout; the accessors alone rule out every other 1.0/1.1 layout.
    agreeing = [name for name, lay in same_minor.items() if not mismatches(derived, lay)]
    assert agreeing == [table.entry("1.1.1l").layout]


def test_openssl_35_connection_check() -> None:
    derived = derive(OPENSSL_352)
    assert derived == {"ssl_type": 0, "ssl_version": 72, "server": 120, "session": 2304}


def test_openssl_40_embedded_s3_split_by_stateless(table: OffsetTable) -> None:
    derived = derive(DEBIAN_403)
    assert derived == {
        "ssl_type": 0,
        "ssl_version": 72,
        "s3_is_pointer": False,
        "client_random": 392,
        "server_random": 360,
        "s3": 352,
        "s3_client_random": 40,
        "s3_server_random": 8,
    }
    layout = table.lookup("4.0.2")
    assert layout is not None and mismatches(derived, layout) == []
    assert layout_value(layout, "client_random") == layout.s3 + layout.s3_client_random


def test_embedded_s3_without_stateless_gives_only_the_sums() -> None:
    functions = {k: v for k, v in DEBIAN_403.items() if k != "SSL_stateless"}
    derived = derive(functions)
    assert derived["client_random"] == 392 and derived["server_random"] == 360
    assert "s3" not in derived and "s3_client_random" not in derived


def test_master_key_with_memcpy_through_plt() -> None:
    addr, hexcode = DEBIAN_30_MASTER_KEY
    # the memcpy call target (0x1fef0) lies in the PLT: an external call
    code = CodeImage([(addr, bytes.fromhex(hexcode))], external=[(0x1FE00, 0x20000)])
    derived = derive_from_code(code, {"SSL_SESSION_get_master_key": addr})
    assert derived == {"session_master_key_length": 8, "session_master_key": 80}


def test_thin_wrappers_are_followed() -> None:
    derived = derive(
        {
            # SSL_is_server: jmp 0x2000 / 0x2000: mov eax, [rdi+0x38]; ret
            "SSL_is_server": (0x1000, "e9fb0f0000"),
            "_is_server_impl": (0x2000, "8b4738c3"),
            # SSL_get_session: sub rsp, 8; call 0x3000; add rsp, 8; ret
            "SSL_get_session": (0x1100, "4883ec08e8f71e00004883c408c3"),
            "_get_session_impl": (0x3000, "488b8710050000c3"),
        }
    )
    assert derived == {"server": 56, "session": 0x510}


def test_call_that_is_not_a_wrapper_stays_opaque() -> None:
    # sub rsp, 8; call 0x3000; mov eax, [rax+0x38]; add rsp, 8; ret: the field is read from
    # what the call returned, which is not the SSL
    derived = derive(
        {
            "SSL_is_server": (0x1000, "4883ec08e8f71f00008b40384883c408c3"),
            "_impl": (0x3000, "4889f8c3"),  # mov rax, rdi; ret (would make it look direct)
        }
    )
    assert "server" not in derived


def test_two_different_members_returned_is_refused() -> None:
    # test esi, esi; je +4; mov eax, [rdi+4]; ret; mov eax, [rdi+8]; ret
    derived = derive({"SSL_version": (0x1000, "85f674048b4704c38b4708c3")})
    assert derived == {}


def test_wrong_size_is_refused() -> None:
    # SSL_version returning a byte (movzx eax, byte [rdi+4]; ret) is not `s->version`
    assert derive({"SSL_version": (0x1000, "0fb64704c3")}) == {}


def test_copy_from_two_places_is_refused() -> None:
    functions = dict(OPENSSL_111L)
    # SSL_get_client_random copying from s3+0xb8 and from SSL+0x200:
    # mov rax, [rdi+0xa8]; mov rcx, [rax+0xb8]; mov [rsi], rcx;
    # mov rcx, [rdi+0x200]; mov [rsi+8], rcx; mov eax, 0x20; ret
    functions["SSL_get_client_random"] = (
        0xE3F50,
        "488b87a8000000488b88b800000048890e488b8f0002000048894e08b820000000c3",
    )
    derived = derive(functions)
    assert not {"s3", "s3_is_pointer", "s3_client_random", "s3_server_random"} & derived.keys()
    assert derived["session"] == 1296  # the rest is unaffected


# Hand-assembled SSL_get_*_random whose copy has a block path for n >= 64 that cannot run
# (n = min(outlen, 32)); it reads 0x30 past the array and must be pruned, not counted:
#   mov eax, 0x20; cmp rdx, rax; cmovbe rax, rdx; lea rcx, [rdi+DISP]; cmp eax, 0x40
#   jae big; movdqu xmm0, [rcx]; movups [rsi], xmm0; movdqu xmm0, [rcx+0x10]
#   movups [rsi+0x10], xmm0; ret
#   big: movdqu xmm0, [rcx+0x30]; movups [rsi+0x30], xmm0; ret
_CLAMPED_COPY = (
    "b8200000004839c2480f46c2488d8f{disp}83f8407311f30f6f010f1106f30f6f41100f114610c3"
    "f30f6f41300f114630c3"
)


def test_dead_copy_path_is_pruned_by_the_clamp() -> None:
    derived = derive(
        {
            "SSL_get_client_random": (0x1000, _CLAMPED_COPY.format(disp="88010000")),
            "SSL_get_server_random": (0x2000, _CLAMPED_COPY.format(disp="68010000")),
        }
    )
    assert derived == {"s3_is_pointer": False, "client_random": 392, "server_random": 360}


def test_randoms_overlapping_are_refused() -> None:
    functions = dict(DEBIAN_403)
    addr, _ = functions["SSL_get_server_random"]
    overlapping = _RANDOM_403.format(call="13cc0300", disp="78010000")  # server at 376
    functions["SSL_get_server_random"] = (addr, overlapping)
    derived = derive(functions)
    assert "client_random" not in derived and "s3" not in derived


def test_mixed_connection_checks_give_no_connection_fields() -> None:
    # SSL_version with the 3.2+ check, SSL_is_server without it: no connection field at all
    functions = {
        "SSL_version": OPENSSL_352["SSL_version"],
        "SSL_is_server": OPENSSL_111L["SSL_is_server"],
        "SSL_CIPHER_get_id": OPENSSL_111L["SSL_CIPHER_get_id"],
    }
    assert derive(functions) == {"cipher_id": 24}


def test_stateless_disagreeing_with_randoms_is_refused() -> None:
    functions = dict(DEBIAN_403)
    addr, hexcode = functions["SSL_stateless"]
    # or/and on [rbx+0x190] instead of [rbx+0x160]: s3.flags would lie inside the randoms
    functions["SSL_stateless"] = (addr, hexcode.replace("60010000", "90010000"))
    derived = derive(functions)
    assert "s3" not in derived and derived["client_random"] == 392


def test_early_exporter_passed_to_hkdf() -> None:
    # 0x1000 cmp dword [rdi], 0x304; je 0x100b; xor eax, eax; ret
    # 0x100b push rbx; lea rdx, [rdi+0x834]; call 0x9000 (not in the image); pop rbx; ret
    code = "813f04030000" "7403" "31c0c3" "53" "488d9734080000" "e8" + (
        (0x9000 - 0x1018).to_bytes(4, "little").hex()
    ) + "5b" "c3"
    derived = derive({"SSL_export_keying_material_early": (0x1000, code)})
    assert derived == {"early_exporter_master_secret": 0x834}


def test_derive_offsets_on_non_elf(tmp_path: Path) -> None:
    path = tmp_path / "libssl.so.3"
    path.write_bytes(b"not an ELF file")
    assert derive_offsets(path) == {}


def test_symbol_lookup_prefers_global_and_shares_tails() -> None:
    import struct

    from keytap.tls.accessors import _find_symbols

    strtab = b"\0xSSL_version\0SSL_is_server\0"
    func_global, func_local = (1 << 4) | 2, 2

    def sym(name: int, info: int, shndx: int, value: int) -> bytes:
        return struct.pack("<IBBHQQ", name, info, 0, shndx, value, 4)

    symtab = b"".join(
        [
            sym(0, 0, 0, 0),
            sym(2, func_local, 1, 0x1000),  # "SSL_version" as the tail of "xSSL_version"
            sym(2, func_global, 1, 0x2000),
            sym(14, func_global, 0, 0),  # undefined: an import, not a definition
        ]
    )
    found = _find_symbols(symtab, strtab, ["SSL_version", "SSL_is_server"])
    assert found == {"SSL_version": (0x2000, 4)}


# cryptography 45.0.7 wheel (OpenSSL 3.5.2), internal functions named in its .symtab.
_GENERATE_HANDSHAKE_SECRET = (
    0x35B580,
    "41544989d4554889f5534889fbe8de00feff4d89e04889e94889df488d937c0500004c8d8bbc050000"
    "4889c65b5d415ce98bfcffff",  # ends in `jmp tls13_generate_secret` (0x35b240)
)
_STORE_HANDSHAKE_TRAFFIC_HASH = (
    0x35B970,
    "53be010000004889fb4883ec10e82e4d230085c07421488d4c2408488db33c070000ba400000004889df"
    "e891a2feff85c00f95c00fb6c04883c4105bc3",
)


def test_static_build_internal_anchors() -> None:
    functions = {
        "tls13_generate_handshake_secret": _GENERATE_HANDSHAKE_SECRET,
        "tls13_store_handshake_traffic_hash": _STORE_HANDSHAKE_TRAFFIC_HASH,
        "_tls13_generate_secret": (0x35B240, "c3"),  # stand-in: the jump target exists
    }
    code, symbols = image(functions)
    sizes = {"tls13_generate_handshake_secret": 53, "tls13_store_handshake_traffic_hash": 61}
    derived = derive_from_code(code, symbols, sizes)
    assert derived == {"handshake_secret": 1468, "handshake_traffic_hash": 1852}
    # Without the symbol's size the jump cannot be told from a branch inside the function,
    # so what the tail call is handed is not counted.
    assert "handshake_secret" not in derive_from_code(code, symbols)
