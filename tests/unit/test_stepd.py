"""node_agent.jobs.stepd against a fake slurmstepd: a Unix socket server in a thread that
speaks the binary protocol byte for byte as req.c does (native byte order, raw ints, bool 1
byte, SCM_RIGHTS with a one-byte message), in the 22.05 and the 25.11+ layouts."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node_agent.jobs import stepd
from node_agent.jobs.stepd import Stepd, StepdError, StepdRefused
from tests.unit.fakes import V22_05, V23_11, V25_11, V26_05, FakeStepd, answer, send_fd

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / f"node1_42.{stepd.EXTERN_STEP}")


@pytest.fixture
def make_fake(sock_path: str) -> Iterator[Callable[..., FakeStepd]]:
    made: list[FakeStepd] = []

    def make(**kwargs: int) -> FakeStepd:
        fake = FakeStepd(sock_path, **kwargs)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.stop()


# -- handshake -----------------------------------------------------------------------

def test_handshake_bytes_of_the_docstring() -> None:
    assert struct.pack("=i", V22_05) == bytes([0x00, 0x26, 0x00, 0x00])   # little-endian host
    assert stepd.KNOWN_VERSIONS[9728] == "22.05"


@pytest.mark.parametrize("version", [V22_05, V23_11, V25_11, V26_05])
def test_handshake_announces_the_newest_and_takes_the_stepds(
        make_fake: Callable[..., FakeStepd], sock_path: str, version: int) -> None:
    # A 25.11/26.05 stepd refuses clients below 24.05/24.11: announcing 22.05 would fail.
    fake = make_fake(version=version, min_version=version - 3 * 256)
    with Stepd(sock_path) as conn:
        assert conn.version == version
    assert fake.client_versions == [stepd.ANNOUNCED_VERSION]
    assert stepd.ANNOUNCED_VERSION >= V26_05


def test_stepd_rejecting_our_version(make_fake: Callable[..., FakeStepd],
                                     sock_path: str) -> None:
    make_fake(version=99 << 8, min_version=98 << 8)
    with pytest.raises(StepdError, match="refused our protocol version") as info:
        Stepd(sock_path)
    assert sock_path in str(info.value)


@pytest.mark.parametrize("version", [37 << 8, 99 << 8, 0])
def test_unknown_stepd_version(make_fake: Callable[..., FakeStepd], sock_path: str,
                               version: int) -> None:
    make_fake(version=version)
    with pytest.raises(StepdError, match=f"unsupported slurmstepd protocol version {version}"):
        Stepd(sock_path)


def test_no_socket(sock_path: str) -> None:
    with pytest.raises(StepdError) as info:
        Stepd(sock_path)
    assert info.value.errno == 2 and info.value.path == sock_path
    assert isinstance(info.value, OSError)


# -- each call, several on one connection ----------------------------------------------

def test_calls_22_05(make_fake: Callable[..., FakeStepd], sock_path: str) -> None:
    fake = make_fake()
    fake.uid = 4294967294              # uid_t is unsigned
    with Stepd(sock_path) as conn:
        assert conn.state() == 2
        assert conn.uid() == 4294967294
        assert conn.pids() == [4242, 4243, 4244]
        assert conn.pid_in_container(4242) is True
        assert conn.pid_in_container(4243) is False
        assert conn.daemon_pid() == 777
        conn.add_extern_pid(5555)
        assert conn.state() == 2
        with pytest.raises(StepdError, match="25.11"):
            conn.sluid()                    # not asked: opcode 1 is defunct in 22.05
        assert conn.uid() == 4294967294     # ... so the connection still works
    assert [op for op, _ in fake.requests] == [5, 20, 15, 8, 8, 9, 22, 5, 20]
    assert (22, 5555) in fake.requests and (8, 4243) in fake.requests


def test_calls_25_11(make_fake: Callable[..., FakeStepd], sock_path: str) -> None:
    fake = make_fake(version=V25_11)
    fake.pids = []
    with Stepd(sock_path) as conn:
        assert conn.sluid() == 0x1234_5678_9ABC
        assert conn.pids() == []
        conn.add_extern_pid(5555)
        assert conn.uid() == 1001
    assert [op for op, _ in fake.requests] == [1, 15, 22, 20]


@pytest.mark.parametrize(("version", "state", "name"), [
    (V22_05, 3, "ending"), (V23_11, 3, "cancelled"), (V23_11, 4, "ending"),
    (V22_05, 4, "unknown (4)"), (V25_11, 2, "running")])
def test_state_names(version: int, state: int, name: str) -> None:
    assert stepd.state_name(version, state) == name


# -- refusals and broken stepds -------------------------------------------------------

def test_add_extern_pid_refused_keeps_the_connection(
        make_fake: Callable[..., FakeStepd], sock_path: str) -> None:
    fake = make_fake()
    fake.extern_rc = -1
    with Stepd(sock_path) as conn:
        with pytest.raises(StepdRefused, match="refused to add pid 5555"):
            conn.add_extern_pid(5555)
        assert conn.uid() == 1001


def test_add_extern_pid_refused_by_hanging_up_25_11(
        make_fake: Callable[..., FakeStepd], sock_path: str) -> None:
    fake = make_fake(version=V25_11)
    fake.extern_rc = None
    with Stepd(sock_path) as conn:
        with pytest.raises(StepdRefused, match="closed the connection"):
            conn.add_extern_pid(5555)
        with pytest.raises(StepdError, match="connection closed"):
            conn.uid()


def test_hang_up_on_22_05_is_not_a_refusal(make_fake: Callable[..., FakeStepd],
                                           sock_path: str) -> None:
    fake = make_fake()
    fake.extern_rc = None
    with Stepd(sock_path) as conn, pytest.raises(StepdError) as info:
        conn.add_extern_pid(5555)
    assert not isinstance(info.value, StepdRefused)


def test_silent_stepd_times_out(make_fake: Callable[..., FakeStepd], sock_path: str) -> None:
    fake = make_fake()
    fake.silent = True
    start = time.monotonic()
    with pytest.raises(StepdError, match="within 0.3 s"):
        Stepd(sock_path, timeout=0.3)
    assert 0.25 < time.monotonic() - start < 2


def test_each_call_has_its_own_deadline(make_fake: Callable[..., FakeStepd],
                                        sock_path: str) -> None:
    fake = make_fake()
    fake.handlers[5] = answer(struct.pack("=i", 2), delay=0.2)
    with Stepd(sock_path, timeout=0.3) as conn:
        for _ in range(3):             # 0.6 s in all, each call under 0.3 s
            assert conn.state() == 2
        fake.handlers[5] = answer(b"", delay=5)
        start = time.monotonic()
        with pytest.raises(StepdError, match="no answer to REQUEST_STATE"):
            conn.state()
        assert time.monotonic() - start < 1.5


def test_closed_mid_reply(make_fake: Callable[..., FakeStepd], sock_path: str) -> None:
    fake = make_fake()
    # 3 pids announced, one sent, then the stepd dies.
    fake.handlers[15] = answer(struct.pack("=II", 3, 4242), keep=False)
    with Stepd(sock_path) as conn:
        with pytest.raises(StepdError, match="4 of 12 bytes") as info:
            conn.pids()
        assert "REQUEST_STEP_LIST_PIDS" in str(info.value) and sock_path in str(info.value)
        with pytest.raises(StepdError, match="connection closed"):
            conn.state()


def test_closed_mid_int(make_fake: Callable[..., FakeStepd], sock_path: str) -> None:
    fake = make_fake()
    fake.handlers[20] = answer(b"\x01\x02", keep=False)
    with Stepd(sock_path) as conn, pytest.raises(StepdError, match="2 of 4 bytes"):
        conn.uid()


def test_short_reads_are_looped(make_fake: Callable[..., FakeStepd], sock_path: str) -> None:
    fake = make_fake()

    def trickle(conn: socket.socket) -> bool:
        for byte in struct.pack("=I", 65534):
            conn.sendall(bytes([byte]))
            time.sleep(0.02)
        return True

    fake.handlers[20] = trickle
    with Stepd(sock_path) as conn:
        assert conn.uid() == 65534


# -- namespace fds ----------------------------------------------------------------------

def open_files() -> set[str]:
    """What this process's fds point to, sockets and the listing's own fd left out."""
    links = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            links.add(os.readlink(f"/proc/self/fd/{name}"))
        except FileNotFoundError:   # the listdir's own fd, closed by now
            continue
    return {link for link in links if not link.startswith("socket:")}


def test_ns_fd_22_05(make_fake: Callable[..., FakeStepd], sock_path: str,
                     tmp_path: Path) -> None:
    target = tmp_path / "ns-stand-in"
    target.write_text("x")
    fake = make_fake()
    fake.ns = [(CLONE_NEWNS, str(target))]
    with Stepd(sock_path) as conn:
        assert str(target) not in open_files()
        fds = conn.ns_fds()
        assert len(fds) == 1 and os.fstat(fds[0]).st_ino == target.stat().st_ino
        assert os.readlink(f"/proc/self/fd/{fds[0]}") == str(target)
        assert os.get_inheritable(fds[0]) is False
        os.close(fds[0])
        assert conn.state() == 2     # the fake has closed its own copy by the next answer
        assert str(target) not in open_files()
        fake.ns = []
        assert conn.ns_fds() == []
        assert conn.state() == 2
        fake.ns_failed = True
        with pytest.raises(StepdError, match="could not open the job's namespace"):
            conn.ns_fds()
    assert [op for op, _ in fake.requests] == [26, 5, 26, 5, 26]


def test_ns_fds_25_11(make_fake: Callable[..., FakeStepd], sock_path: str,
                      tmp_path: Path) -> None:
    one, two = tmp_path / "mnt", tmp_path / "user"
    one.write_text("1")
    two.write_text("2")
    fake = make_fake(version=V26_05)
    fake.ns = [(CLONE_NEWUSER, str(two)), (CLONE_NEWNS, str(one))]
    with Stepd(sock_path) as conn:
        typed = conn.ns_fds_typed()
        assert [kind for kind, _ in typed] == [CLONE_NEWUSER, CLONE_NEWNS]
        assert [os.fstat(fd).st_ino for _, fd in typed] == [two.stat().st_ino,
                                                            one.stat().st_ino]
        assert {str(one), str(two)} <= open_files()
        for _, fd in typed:
            os.close(fd)
        assert conn.uid() == 1001    # the fake has closed its own copies by the next answer
        assert not {str(one), str(two)} & open_files()
        fake.ns = []
        assert conn.ns_fds() == []
    assert [op for op, _ in fake.requests] == [28, 20, 28]


def test_ns_fd_missing_after_announcement(make_fake: Callable[..., FakeStepd],
                                          sock_path: str) -> None:
    fake = make_fake()
    # Announces an fd, then sends a plain byte without SCM_RIGHTS.
    fake.handlers[26] = answer(struct.pack("=i", 7) + b"\0")
    with Stepd(sock_path) as conn:
        before = open_files()
        with pytest.raises(StepdError, match="0 fds"):
            conn.ns_fds()
        assert open_files() == before


def test_ns_fds_partial_then_hang_up_closes_what_came(
        make_fake: Callable[..., FakeStepd], sock_path: str, tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    target.write_text("1")
    fake = make_fake(version=V25_11)

    def partial(conn: socket.socket) -> bool:
        fake._int(conn, 2)
        fd = os.open(target, os.O_RDONLY)
        fake._int(conn, CLONE_NEWNS)
        send_fd(conn, fd)
        os.close(fd)
        return False

    fake.handlers[28] = partial
    with Stepd(sock_path) as conn:
        with pytest.raises(StepdError, match="closed the connection"):
            conn.ns_fds()
        assert str(target) not in open_files()
