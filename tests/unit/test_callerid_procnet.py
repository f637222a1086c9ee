"""/proc/net/tcp{,6} decoding and searching, on literal kernel text and fake tables."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import pytest

from callerid import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    TCP_STATE_NAMES,
    TCP_TIME_WAIT,
    Connection,
    Endpoint,
    KernelFormatError,
    decode_address,
    find_in_tables,
    parse_tcp_table,
    read_tcp_tables,
)
from callerid._procnet import _encode_endpoint
from tests.unit.conftest import TCP_HEADER, FakeProc, kernel_endpoint

little_endian = pytest.mark.skipif(sys.byteorder != "little", reason="literal x86 kernel text")


# Decoding cases: (field as a little-endian kernel prints it, expected endpoint).
DECODE_CASES = [
    # IPv4: each %08X word is byte-reversed on x86.
    ("0100007F:0016", "127.0.0.1:22"),
    ("0B004D0A:1F90", "10.77.0.11:8080"),
    ("00000000:0000", "0.0.0.0:0"),  # port 0 (unbound / listener remote)
    ("FFFFFFFF:FFFF", "255.255.255.255:65535"),  # port 65535
    ("0101A8C0:ffff", "192.168.1.1:65535"),  # lowercase hex is accepted
    # IPv6: four words, each reversed on its own.
    ("00000000000000000000000001000000:0016", "[::1]:22"),
    ("000000FD000000000000000001000000:0016", "[fd00::1]:22"),
    ("B80D0120000000000000000001000000:01BB", "[2001:db8::1]:443"),
    ("00000000000000000000000000000000:0000", "[::]:0"),
    # IPv4-mapped in tcp6: ::ffff:127.0.0.1 collapses to plain IPv4.
    ("0000000000000000FFFF00000100007F:0016", "127.0.0.1:22"),
    ("0000000000000000FFFF00000B004D0A:FFFF", "10.77.0.11:65535"),
]


@little_endian
@pytest.mark.parametrize(("field", "expected"), DECODE_CASES)
def test_decode_address_table(field: str, expected: str) -> None:
    assert decode_address(field) == Endpoint.parse(expected)


@pytest.mark.parametrize(("field", "expected"), DECODE_CASES)
def test_decode_address_big_endian_host(field: str, expected: str) -> None:
    # The same sockets printed by a big-endian kernel: words are not reversed.
    addr, port = field.split(":")
    words = [addr[i : i + 8] for i in range(0, len(addr), 8)]
    be = "".join(bytes.fromhex(w)[::-1].hex().upper() for w in words)
    assert decode_address(f"{be}:{port}", byteorder="big") == Endpoint.parse(expected)


MALFORMED_FIELDS = [
    "",
    "0100007F",  # no port
    "0100007F:",  # empty port
    "0100007F:16",  # port not 4 digits
    "0100007F:00016",
    "100007F:0016",  # 7 hex digits
    "0100007F0:0016",  # 9 hex digits
    "0000000000000000FFFF00000100007:0016",  # 31 hex digits
    "0100007G:0016",  # not hex
    "0100007F:001G",
    "0100007F:0016:0016",
    " 0100007F:0016",
    "+100007F:0016",  # int() would accept a sign; the kernel never prints one
    "0x00007F:0016",
]


@pytest.mark.parametrize("field", MALFORMED_FIELDS)
def test_decode_address_rejects(field: str) -> None:
    with pytest.raises(ValueError):
        decode_address(field)


@pytest.mark.parametrize(("field", "expected"), DECODE_CASES)
def test_encode_is_the_inverse_of_decode(field: str, expected: str) -> None:
    ep = Endpoint.parse(expected)
    v6 = len(field.split(":")[0]) == 32
    assert decode_address(_encode_endpoint(ep, v6)) == ep
    if sys.byteorder == "little":
        assert _encode_endpoint(ep, v6) == field.upper()


def test_kernel_rendering_helper_matches_lab_notes() -> None:
    # LAB-NOTES: 0B004D0A = 10.77.0.11 on x86. Guards the test-side encoder itself.
    if sys.byteorder == "little":
        assert kernel_endpoint("10.77.0.11", 22, v6=False) == "0B004D0A:0016"


# -- whole tables --------------------------------------------------------------------------

# Real lines captured from a kernel (LISTEN sshd, an ESTABLISHED pair, a TIME_WAIT).
REAL_TCP = TCP_HEADER + (
    "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
    "        0 17385 1 0000000000000000 100 0 0 10 0\n"
    "   1: 0100007F:A1B2 0100007F:0016 01 00000000:00000000 02:000A7D1A 00000000  1000"
    "        0 52611 2 0000000000000000 20 4 30 10 -1\n"
    "   2: 0100007F:A1B3 0100007F:0016 06 00000000:00000000 03:00001770 00000000     0"
    "        0 0 3 0000000000000000\n"
)


@little_endian
def test_parse_real_table(tmp_path: Path) -> None:
    path = tmp_path / "tcp"
    path.write_text(REAL_TCP)
    rows = list(parse_tcp_table(path))
    assert [r.state for r in rows] == [TCP_LISTEN, TCP_ESTABLISHED, TCP_TIME_WAIT]
    assert rows[0].local == Endpoint.parse("0.0.0.0:22") and rows[0].inode == 17385
    assert rows[1].local == Endpoint.parse("127.0.0.1:41394")
    assert rows[1].remote == Endpoint.parse("127.0.0.1:22")
    assert (rows[1].uid, rows[1].inode) == (1000, 52611)
    assert rows[2].inode == 0
    assert TCP_STATE_NAMES[rows[2].state] == "TIME_WAIT"


BAD_LINES = [
    ("   0: 0100007F:0016 00000000:0000 0A\n", "fields"),  # truncated line
    ("   0: 0100007Z:0016 00000000:0000 0A 0:0 0:0 0 0 0 1\n", "bad address"),
    ("   0: 0100007F:0016 00000000:0000 XX 0:0 0:0 0 0 0 1\n", "invalid literal"),
    ("   0: 0100007F:0016 00000000:0000 0A 0:0 0:0 0 u 0 1\n", "invalid literal"),
    ("   0: 0100007F:0016 00000000:0000 0A 0:0 0:0 0 0 0 ino\n", "invalid literal"),
    ("   0: 0100007F:0016 00000000:0000 0A 0:0 0:0 0 -1 0 1\n", "negative"),
    ("   0 0100007F:0016 00000000:0000 0A 0:0 0:0 0 0 0 1\n", "fields"),  # no "sl:"
    ("   0: 0100007F:0016 00000000:0000 1 0:0 0:0 0 0 0 1\n", "state"),
]


@pytest.mark.parametrize(("line", "why"), BAD_LINES)
def test_malformed_line_raises_with_file_line_and_text(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "tcp"
    path.write_text(REAL_TCP + line)
    with pytest.raises(KernelFormatError, match=why) as info:
        list(parse_tcp_table(path))
    assert info.value.path == str(path)
    assert info.value.lineno == 5
    assert info.value.line == line.rstrip("\n")
    assert str(path) in str(info.value) and "line 5" in str(info.value)


def test_missing_header_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "tcp"
    path.write_text(REAL_TCP.split("\n", 1)[1])
    with pytest.raises(KernelFormatError, match="header") as info:
        list(parse_tcp_table(path))
    assert info.value.lineno == 1


def test_read_tcp_tables_both_files(fake_proc: FakeProc) -> None:
    fake_proc.add_tcp(("10.0.0.1", 5000), ("10.0.0.2", 22), inode=11)
    fake_proc.add_tcp(("fd00::1", 5001), ("fd00::2", 22), inode=12, v6=True)
    rows = read_tcp_tables(fake_proc.root)
    assert sorted(r.inode for r in rows) == [11, 12]


def test_read_tcp_tables_without_tcp6(fake_proc: FakeProc) -> None:
    # IPv6 disabled at boot: no tcp6 file. Not an error.
    fake_proc.add_tcp(("10.0.0.1", 5000), ("10.0.0.2", 22), inode=11)
    (fake_proc.self_dir / "net" / "tcp6").unlink()
    assert [r.inode for r in read_tcp_tables(fake_proc.root)] == [11]
    conn = Connection(Endpoint.parse("10.0.0.1:5000"), Endpoint.parse("10.0.0.2:22"))
    found = find_in_tables(conn, fake_proc.root)
    assert found is not None and found.inode == 11


def test_read_tcp_tables_without_tcp_is_an_error(fake_proc: FakeProc) -> None:
    (fake_proc.self_dir / "net" / "tcp").unlink()
    with pytest.raises(FileNotFoundError):
        read_tcp_tables(fake_proc.root)


def test_read_tcp_tables_of_a_pid(fake_proc: FakeProc) -> None:
    # /proc/<pid>/net/tcp shows <pid>'s namespace: the pid is part of the path.
    netdir = fake_proc.add_process(77) / "net"
    netdir.mkdir()
    (netdir / "tcp").write_text(REAL_TCP)
    assert len(read_tcp_tables(fake_proc.root, 77)) == 3
    assert read_tcp_tables(fake_proc.root) == []


def _conn(local: str, remote: str) -> Connection:
    return Connection(Endpoint.parse(local), Endpoint.parse(remote))


def test_find_in_tables_ipv4(fake_proc: FakeProc) -> None:
    fake_proc.add_tcp(("0.0.0.0", 22), ("0.0.0.0", 0), state=TCP_LISTEN, inode=10, uid=0)
    fake_proc.add_tcp(("10.0.0.1", 5000), ("10.0.0.2", 22), inode=11)
    fake_proc.add_tcp(("10.0.0.1", 5001), ("10.0.0.2", 22), inode=12, uid=1001)
    found = find_in_tables(_conn("10.0.0.1:5001", "10.0.0.2:22"), fake_proc.root)
    assert found is not None
    assert (found.inode, found.uid, found.state) == (12, 1001, TCP_ESTABLISHED)
    # Orientation matters: the reversed tuple is the other end's socket, not this one.
    assert find_in_tables(_conn("10.0.0.2:22", "10.0.0.1:5001"), fake_proc.root) is None


def test_find_in_tables_ipv6(fake_proc: FakeProc) -> None:
    fake_proc.add_tcp(("fd00::1", 5000), ("fd00::2", 22), inode=21, v6=True)
    found = find_in_tables(_conn("[fd00::1]:5000", "[fd00::2]:22"), fake_proc.root)
    assert found is not None and found.inode == 21
    assert found.local.ip == ipaddress.IPv6Address("fd00::1")


def test_find_in_tables_mapped_in_tcp6_matches_plain_v4(fake_proc: FakeProc) -> None:
    # A dual-stack [::]:22 socket shows its v4 peer as ::ffff:10.0.0.1 in tcp6 only.
    fake_proc.add_tcp(("::ffff:10.0.0.2", 22), ("::ffff:10.0.0.1", 5000), inode=31, v6=True)
    for conn in (
        _conn("10.0.0.2:22", "10.0.0.1:5000"),
        _conn("[::ffff:10.0.0.2]:22", "[::ffff:10.0.0.1]:5000"),
    ):
        found = find_in_tables(conn, fake_proc.root)
        assert found is not None and found.inode == 31
        assert found.local == Endpoint.parse("10.0.0.2:22")


def test_find_in_tables_ignores_listen_time_wait_and_inode_zero(fake_proc: FakeProc) -> None:
    # Every row has the wanted 4-tuple but none is a live, owned connection.
    tup = (("10.0.0.1", 5000), ("10.0.0.2", 22))
    fake_proc.add_tcp(*tup, state=TCP_LISTEN, inode=41)
    fake_proc.add_tcp(*tup, state=TCP_TIME_WAIT, inode=0)
    fake_proc.add_tcp(*tup, state=TCP_ESTABLISHED, inode=0)  # request socket
    conn = _conn("10.0.0.1:5000", "10.0.0.2:22")
    assert find_in_tables(conn, fake_proc.root) is None
    fake_proc.add_tcp(*tup, state=TCP_ESTABLISHED, inode=42)
    found = find_in_tables(conn, fake_proc.root)
    assert found is not None and found.inode == 42


def test_find_in_tables_ports_0_and_65535(fake_proc: FakeProc) -> None:
    fake_proc.add_tcp(("10.0.0.1", 65535), ("10.0.0.2", 1), inode=51)
    found = find_in_tables(_conn("10.0.0.1:65535", "10.0.0.2:1"), fake_proc.root)
    assert found is not None and found.inode == 51
    assert find_in_tables(_conn("10.0.0.1:0", "10.0.0.2:1"), fake_proc.root) is None


def test_find_in_tables_raises_on_truncated_line(fake_proc: FakeProc) -> None:
    path = fake_proc.set_tcp(["   0: 0100007F:0016 00000000:0000 0A\n"])
    with pytest.raises(KernelFormatError) as info:
        find_in_tables(_conn("10.0.0.1:5000", "10.0.0.2:22"), fake_proc.root)
    assert info.value.path == str(path) and info.value.lineno == 2
