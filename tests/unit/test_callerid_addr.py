"""callerid addresses: normalisation of IPv4-mapped IPv6, endpoint parsing, the one
source/destination swap, and the exception tree."""

from __future__ import annotations

import errno
import ipaddress

import pytest

import callerid
from callerid import (
    CgroupError,
    Connection,
    Endpoint,
    Error,
    InvalidJobId,
    KernelFormatError,
    NetlinkUnavailable,
    normalize_ip,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", ipaddress.IPv4Address("10.0.0.1")),
        ("::ffff:10.0.0.1", ipaddress.IPv4Address("10.0.0.1")),
        ("::FFFF:7f00:1", ipaddress.IPv4Address("127.0.0.1")),
        ("[::ffff:10.0.0.1]", ipaddress.IPv4Address("10.0.0.1")),
        ("fd00::1", ipaddress.IPv6Address("fd00::1")),
        ("[fd00::1]", ipaddress.IPv6Address("fd00::1")),
        ("::1", ipaddress.IPv6Address("::1")),
        # IPv4-compatible (deprecated) is not IPv4-mapped: stays IPv6.
        ("::10.0.0.1", ipaddress.IPv6Address("::a00:1")),
        (ipaddress.IPv6Address("::ffff:1.2.3.4"), ipaddress.IPv4Address("1.2.3.4")),
    ],
)
def test_normalize_ip(text: str, expected: object) -> None:
    assert normalize_ip(text) == expected
    assert type(normalize_ip(text)) is type(expected)


@pytest.mark.parametrize("bad", ["", "10.0.0", "10.0.0.256", "fe80::1%eth0", "[::1", "host"])
def test_normalize_ip_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_ip(bad)


def test_endpoint_normalises_and_compares_mapped_equal() -> None:
    mapped = Endpoint(ipaddress.IPv6Address("::ffff:10.0.0.1"), 22)
    plain = Endpoint(ipaddress.IPv4Address("10.0.0.1"), 22)
    assert mapped == plain
    assert hash(mapped) == hash(plain)
    assert mapped.ip.version == 4
    assert Endpoint("10.0.0.1", 22) == plain  # type: ignore[arg-type]


@pytest.mark.parametrize("port", [-1, 65536, 10**9])
def test_endpoint_port_range(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        Endpoint(ipaddress.IPv4Address("10.0.0.1"), port)


def test_endpoint_port_must_be_int() -> None:
    with pytest.raises(TypeError):
        Endpoint(ipaddress.IPv4Address("10.0.0.1"), "22")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Endpoint(ipaddress.IPv4Address("10.0.0.1"), True)


@pytest.mark.parametrize(
    ("text", "ip", "port", "shown"),
    [
        ("10.0.0.1:22", "10.0.0.1", 22, "10.0.0.1:22"),
        ("[fd00::1]:22", "fd00::1", 22, "[fd00::1]:22"),
        ("[::ffff:10.0.0.1]:22", "10.0.0.1", 22, "10.0.0.1:22"),
        ("127.0.0.1:0", "127.0.0.1", 0, "127.0.0.1:0"),
        ("[::1]:65535", "::1", 65535, "[::1]:65535"),
        (" 10.0.0.1:22\n", "10.0.0.1", 22, "10.0.0.1:22"),
    ],
)
def test_endpoint_parse_and_str(text: str, ip: str, port: int, shown: str) -> None:
    ep = Endpoint.parse(text)
    assert ep.ip == ipaddress.ip_address(ip)
    assert ep.port == port
    assert str(ep) == shown
    assert Endpoint.parse(str(ep)) == ep


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("10.0.0.1", "address:port"),
        ("10.0.0.1:", "not a number"),
        ("10.0.0.1:ssh", "not a number"),
        ("10.0.0.1:-1", "not a number"),
        ("10.0.0.1:65536", "out of range"),
        ("fd00::1:22", "brackets"),
        ("[fd00::1]22", r"\[IPv6\]:port"),
        ("[fd00::1", r"\[IPv6\]:port"),
        ("host:22", "not an IP address"),
        (":22", "address:port"),
        ("10.0.0.1:２２", "not a number"),  # fullwidth digits are not a port
    ],
)
def test_endpoint_parse_rejects_with_clear_message(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Endpoint.parse(text)


def test_connection_from_ssh_connection_is_the_source_view() -> None:
    # SSH_CONNECTION="10.0.0.1 40000 10.0.0.2 22" as sshd on node2 sees it; the question
    # goes to node1, where the client's socket is local.
    src, dst = Endpoint.parse("10.0.0.1:40000"), Endpoint.parse("10.0.0.2:22")
    conn = Connection.from_ssh_connection(src, dst)
    assert conn.local == src
    assert conn.remote == dst
    assert str(conn) == "10.0.0.1:40000 -> 10.0.0.2:22"


def test_connection_from_mapped_ssh_connection() -> None:
    # sshd listening on [::] reports a v4 client as ::ffff:a.b.c.d.
    src = Endpoint.parse("[::ffff:10.0.0.1]:40000")
    dst = Endpoint.parse("[::ffff:10.0.0.2]:22")
    conn = Connection.from_ssh_connection(src, dst)
    assert conn == Connection(Endpoint.parse("10.0.0.1:40000"), Endpoint.parse("10.0.0.2:22"))


def test_dataclasses_are_frozen() -> None:
    ep = Endpoint.parse("10.0.0.1:22")
    with pytest.raises(AttributeError):
        ep.port = 23  # type: ignore[misc]


# -- exception tree ------------------------------------------------------------------------


def test_exception_tree() -> None:
    assert issubclass(KernelFormatError, Error) and issubclass(KernelFormatError, ValueError)
    assert issubclass(InvalidJobId, Error) and issubclass(InvalidJobId, ValueError)
    assert issubclass(CgroupError, Error) and issubclass(CgroupError, OSError)
    assert issubclass(NetlinkUnavailable, Error)


def test_kernel_format_error_names_file_line_and_text() -> None:
    exc = KernelFormatError("/proc/net/tcp", 7, "garbage here\n", "expected 10 fields")
    assert (exc.path, exc.lineno, exc.line) == ("/proc/net/tcp", 7, "garbage here")
    text = str(exc)
    assert "/proc/net/tcp" in text and "line 7" in text and "garbage here" in text
    assert "expected 10 fields" in text


def test_kernel_format_error_truncates_huge_lines() -> None:
    exc = KernelFormatError("/x", 1, "A" * 10000)
    assert len(str(exc)) < 200
    assert exc.line == "A" * 10000  # the attribute keeps everything


def test_cgroup_error_wraps_oserror() -> None:
    cause = OSError(errno.EBUSY, "Device or resource busy")
    exc = CgroupError("cannot remove /cg/job_1: Device or resource busy", "/cg/job_1", cause=cause)
    assert exc.errno == errno.EBUSY
    assert exc.path == "/cg/job_1"
    assert str(exc) == "cannot remove /cg/job_1: Device or resource busy"
    assert exc.__cause__ is cause
    plain = CgroupError("not mounted")
    assert plain.errno is None and plain.path is None


def test_public_api_is_exported() -> None:
    for name in callerid.__all__:
        assert hasattr(callerid, name), name
    for name in ["Resolver", "SockDiag", "CgroupLayout", "Endpoint", "decode_address"]:
        assert name in callerid.__all__
