"""A client of slurmstepd's Unix-socket protocol: ask a job step's stepd about the step, and
adopt a process into the extern step the way pam_slurm_adopt does (REQUEST_ADD_EXTERN_PID).

Stdlib only. Facts read from Slurm's source (SchedMD/slurm: ``src/common/stepd_api.[ch]``,
``src/slurmd/slurmstepd/req.c``, ``src/common/slurm_protocol_common.h``, ``src/common/fd.c``)
at the tags 22.05.0 - 26.05.3 and master (26.11, unreleased); exercised against a real
22.05.8 stepd in this project's lab (../shared/SLURM-NOTES.md).

The wire
--------
Raw C values in the host's byte order (little-endian on x86_64), no framing, no length
prefixes: ``int``, ``pid_t``, ``uid_t``, ``uint32_t`` are 4 bytes, ``bool`` is 1 byte,
``sluid_t`` (a ``uint64_t``) 8 bytes. File descriptors travel as SCM_RIGHTS ancillary data on
a one-byte message. The stepd has no timeouts and no framing to resynchronise on, so every
call here is bounded by its own deadline and any error leaves the connection closed.

Handshake (unchanged 22.05 - 26.11)::

    client -> stepd   int  the client's protocol version
    stepd  -> client  int  the stepd's own SLURM_PROTOCOL_VERSION, or -1 and close when
                           the client's is below the stepd's SLURM_MIN_PROTOCOL_VERSION

Worked example: 22.05's version is ``38 << 8 | 0`` = 9728 = 0x00002600, written little-endian
as the four bytes ``00 26 00 00``; a 22.05 stepd answers the same four bytes. No credential is
sent, in any version: the stepd learns the caller's uid and pid from the socket
(SO_PEERCRED; ``net_get_peer()`` from 25.11).

Which version the client announces: the stepd checks only a *lower* bound (three releases
back: 22.05 accepts >= 20.11, 25.11 accepts >= 24.05) and otherwise ignores the client's
version (req.c stores it only for a debug line). Every reply layout depends on the stepd's
version alone. So the client announces the newest version it knows (`ANNOUNCED_VERSION`),
which every stepd from 22.05 up to three releases after it accepts, and picks the layout from
the stepd's answer. Announcing 22.05's 9728 instead would be refused by a 25.11 stepd.

Then requests, several per connection: an ``int`` opcode, the request's fields, the reply.
An unknown opcode makes the stepd close the connection without a reply.

====  ========================  ==============  ======================================  =======
op    request                   after op        reply                                   since
====  ========================  ==============  ======================================  =======
1     REQUEST_SLUID             -               uint64 sluid                            25.11
5     REQUEST_STATE             -               int state (`state_name`)                <22.05
8     REQUEST_PID_IN_CONTAINER  pid_t           bool (1 byte)                           <22.05
9     REQUEST_DAEMON_PID        -               pid_t                                   <22.05
15    REQUEST_STEP_LIST_PIDS    -               uint32 n, n x uint32                    <22.05
20    REQUEST_STEP_UID          -               uid_t                                   <22.05
22    REQUEST_ADD_EXTERN_PID    pid_t           int rc (0 or -1)                        <22.05
26    REQUEST_GET_NS_FD         -               int fd; if > 0 one fd (SCM_RIGHTS)      <22.05
28    REQUEST_GET_NS_FDS        -               int n; n x (int CLONE_NEW* type, 1 fd)  25.11
====  ========================  ==============  ======================================  =======

The opcode enum (``step_msg_t`` in stepd_api.h) only grew at its end over 22.05 - 26.11; slot
1 changed from REQUEST_STEP_DEFUNCT_1 to REQUEST_SLUID in 25.11. What changed by version:

- 22.05, 23.02 (9728, 9984): states 0 not running, 1 starting, 2 running, 3 ending.
  ADD_EXTERN_PID from a uid other than root/SlurmUser: rc -1, connection kept.
- 23.11 - 25.05 (10240, 10496, 10752, 11008): state 3 is now CANCELLED, 4 ENDING. 24.11
  sends the GET_NS_FD fd with send_fd_over_socket instead of send_fd_over_pipe: the same
  bytes on the wire (one data byte + SCM_RIGHTS).
- 25.11, 26.05, 26.11 (11264, 11520, 11776): a per-request permission table: a request the
  caller may not make (ADD_EXTERN_PID needs root/SlurmUser; GET_NS_FD(S) the job's owner,
  root or SlurmUser) is answered by *closing the connection*, not by rc -1. ADD_EXTERN_PID
  on a step that is cancelled or ending is refused the same way. GET_NS_FD now answers only
  with the mount namespace and writes *nothing* when the job has none (the client would
  wait forever): use GET_NS_FDS (28) there, which answers ``n = 0`` when there is none.

Errors::

    OSError
     +-- StepdError      cannot connect, timeout, closed, protocol error, unsupported
          +-- StepdRefused   the stepd refused ADD_EXTERN_PID (rc -1; or, 25.11+, it closed
                             the connection instead of answering)
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import time
from types import TracebackType

__all__ = [
    "ANNOUNCED_VERSION",
    "BATCH_STEP",
    "EXTERN_STEP",
    "INTERACTIVE_STEP",
    "KNOWN_VERSIONS",
    "Stepd",
    "StepdError",
    "StepdRefused",
    "state_name",
    "version_name",
]

#: The step ids of the special steps (slurm.h SLURM_EXTERN_CONT, SLURM_BATCH_SCRIPT,
#: SLURM_INTERACTIVE_STEP; the same values 22.05 - 26.11). A stepd's socket is named
#: ``<NodeName>_<jobid>.<stepid>`` with these as decimal numbers (4294967292 ...).
EXTERN_STEP: int = 0xFFFFFFFC
BATCH_STEP: int = 0xFFFFFFFB
INTERACTIVE_STEP: int = 0xFFFFFFFA   # salloc's interactive step (use_interactive_step)


def _ver(major: int) -> int:
    """Slurm's protocol version number: ``MAKE_SLURM_VER(major) = major << 8 | 0``."""
    return major << 8


V22_05, V23_02, V23_11, V24_05 = _ver(38), _ver(39), _ver(40), _ver(41)
V24_11, V25_05, V25_11, V26_05, V26_11 = _ver(42), _ver(43), _ver(44), _ver(45), _ver(46)

#: Protocol version -> Slurm release, for every stepd version whose layouts this module
#: knows (read at the tags; 26.11 from master, not yet released when read).
KNOWN_VERSIONS: dict[int, str] = {
    V22_05: "22.05", V23_02: "23.02", V23_11: "23.11", V24_05: "24.05",
    V24_11: "24.11", V25_05: "25.05", V25_11: "25.11", V26_05: "26.05", V26_11: "26.11",
}

#: What the client writes in the handshake: the newest version it knows (see the module
#: docstring for why, not the oldest).
ANNOUNCED_VERSION: int = max(KNOWN_VERSIONS)

# Opcodes (step_msg_t). The numbers did not move 22.05 - 26.11; the version gates say which
# exist.
_REQUEST_SLUID = 1                  # 25.11+
_REQUEST_STATE = 5
_REQUEST_PID_IN_CONTAINER = 8
_REQUEST_DAEMON_PID = 9
_REQUEST_STEP_LIST_PIDS = 15
_REQUEST_STEP_UID = 20
_REQUEST_ADD_EXTERN_PID = 22
_REQUEST_GET_NS_FD = 26            # up to 25.05 (it still exists later, see the docstring)
_REQUEST_GET_NS_FDS = 28            # 25.11+

_CLONE_NEWNS = 0x00020000           # <sched.h>: what the pre-25.11 GET_NS_FD fd is
_MAX_NS_FDS = 16                    # Linux has 8 namespace types; more is a protocol error
_MAX_PIDS = 4 * 1024 * 1024         # above pid_max's ceiling (2^22): a protocol error

_INT = struct.Struct("=i")
_UINT = struct.Struct("=I")
_U64 = struct.Struct("=Q")


def version_name(version: int) -> str:
    """``9728`` -> ``"22.05"``; a version this module does not know -> ``"9472"``."""
    return KNOWN_VERSIONS.get(version, str(version))


def state_name(version: int, state: int) -> str:
    """The name of a REQUEST_STATE answer from a stepd of *version*
    (slurmstepd_state_t): 22.05 and 23.02 have no "cancelled", so 3 is "ending" there and
    "cancelled" from 23.11 on (where "ending" is 4)."""
    names = ["not running", "starting", "running"]
    names += ["ending"] if version < V23_11 else ["cancelled", "ending"]
    return names[state] if 0 <= state < len(names) else f"unknown ({state})"


class StepdError(OSError):
    """Talking to a slurmstepd failed: cannot connect, timeout, closed, protocol error or an
    unsupported version. ``path`` is the socket; ``errno`` is set when an OS error caused it
    (ENOENT / ECONNREFUSED: a stale socket of a step that is gone)."""

    def __init__(self, path: str, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.errno = err
        self.filename = path

    def __str__(self) -> str:
        return f"slurmstepd {self.path}: {self.message}"


class StepdRefused(StepdError):
    """The stepd refused the request (ADD_EXTERN_PID answered -1, or from 25.11 closed
    the connection instead: caller not root/SlurmUser, step cancelled or ending, or the pid
    could not be added). The stepd logs the reason."""


class _HungUp(StepdError):
    """The stepd closed the connection before the first byte of an answer."""


class Stepd:
    """One connection to one slurmstepd socket (``<spool>/<node>_<job>.<step>``).

    Connecting does the version handshake; each call then has its own deadline of
    *timeout* seconds. After any StepdError other than an rc -1 refusal the connection is
    closed (the byte stream cannot be resynchronised) and later calls raise StepdError.
    A context manager; not thread-safe (one request at a time per connection).
    """

    #: The stepd's protocol version (its SLURM_PROTOCOL_VERSION), a key of KNOWN_VERSIONS.
    version: int

    def __init__(self, path: str, timeout: float = 2.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._deadline = time.monotonic() + timeout
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(path)
            except TimeoutError:
                raise self._fail("connect timed out") from None
            except OSError as exc:
                raise self._fail(f"cannot connect: {exc.strerror or exc}", exc.errno) from exc
            self._send(_INT.pack(ANNOUNCED_VERSION))
            answer = self._read_int("the handshake")
            if answer < 0:
                raise self._fail(
                    f"refused our protocol version {ANNOUNCED_VERSION} "
                    f"({version_name(ANNOUNCED_VERSION)}): the stepd is newer than this "
                    "client knows")
            if answer not in KNOWN_VERSIONS:
                raise self._fail(f"unsupported slurmstepd protocol version {answer}")
            self.version = answer
        except BaseException:
            self.close()
            raise

    # -- the requests ------------------------------------------------------------------

    def state(self) -> int:
        """REQUEST_STATE: the step's slurmstepd_state_t (`state_name` names it; the
        numbering changed in 23.11)."""
        self._request(_REQUEST_STATE)
        return self._read_int("REQUEST_STATE")

    def uid(self) -> int:
        """REQUEST_STEP_UID: the uid the step runs as."""
        self._request(_REQUEST_STEP_UID)
        return self._read_uint("REQUEST_STEP_UID")

    def pids(self) -> list[int]:
        """REQUEST_STEP_LIST_PIDS: the pids in the step's proctrack container (what
        ``scontrol listpids`` shows), in the stepd's pid namespace."""
        self._request(_REQUEST_STEP_LIST_PIDS)
        count = self._read_uint("REQUEST_STEP_LIST_PIDS")
        if count > _MAX_PIDS:
            raise self._fail(f"protocol error: REQUEST_STEP_LIST_PIDS says {count} pids")
        data = self._recv_exact(4 * count, "REQUEST_STEP_LIST_PIDS")
        return list(struct.unpack(f"={count}I", data))

    def pid_in_container(self, pid: int) -> bool:
        """REQUEST_PID_IN_CONTAINER: whether *pid* is in the step's container (proctrack's
        has_pid: with proctrack/cgroup the step's own cgroup exactly)."""
        self._request(_REQUEST_PID_IN_CONTAINER, _INT.pack(pid))
        return self._recv_exact(1, "REQUEST_PID_IN_CONTAINER") != b"\0"

    def daemon_pid(self) -> int:
        """REQUEST_DAEMON_PID: the slurmstepd's own pid."""
        self._request(_REQUEST_DAEMON_PID)
        return self._read_int("REQUEST_DAEMON_PID")

    def sluid(self) -> int:
        """REQUEST_SLUID (25.11+): the step's SLUID, the number behind the job's cgroup
        directory name on cgroup v2 from 26.05 (0 when it has none). StepdError on older
        stepds, without asking (opcode 1 was defunct there: the stepd would hang up)."""
        if self.version < V25_11:
            raise StepdError(self.path, f"REQUEST_SLUID needs Slurm 25.11+, the stepd is "
                             f"{version_name(self.version)}")
        self._request(_REQUEST_SLUID)
        return int(_U64.unpack(self._recv_exact(8, "REQUEST_SLUID"))[0])

    def add_extern_pid(self, pid: int) -> None:
        """REQUEST_ADD_EXTERN_PID: adopt *pid* (in the stepd's pid namespace) into this
        extern step: its cgroups through proctrack and the task plugins, accounting, and a
        watch that re-adopts its orphans. Only root and SlurmUser may ask. StepdRefused
        when the stepd says no (rc -1 and the connection stays usable; from 25.11 also a
        hang-up instead of an answer, after which the connection is closed)."""
        self._request(_REQUEST_ADD_EXTERN_PID, _INT.pack(pid))
        try:
            rc = self._read_int("REQUEST_ADD_EXTERN_PID")
        except _HungUp:
            if self.version >= V25_11:
                raise StepdRefused(
                    self.path, f"refused to add pid {pid}: closed the connection without "
                    "an answer (25.11+: the caller is not root/SlurmUser, or the step is "
                    "cancelled or ending)") from None
            raise
        if rc != 0:
            raise StepdRefused(self.path, f"refused to add pid {pid} (rc {rc}; the stepd "
                               "logs why: not an extern step, caller not root/SlurmUser, "
                               "or the pid could not be added)")

    def ns_fds(self) -> list[int]:
        """The job's namespace fds (job_container/tmpfs, namespace/* plugins) over
        SCM_RIGHTS, opened close-on-exec; the caller owns and closes them. An empty list
        when the job has no namespace of its own. Before 25.11 REQUEST_GET_NS_FD (at most
        the mount namespace); from 25.11 REQUEST_GET_NS_FDS (every namespace)."""
        return [fd for _kind, fd in self.ns_fds_typed()]

    def ns_fds_typed(self) -> list[tuple[int, int]]:
        """Like `ns_fds`, as (CLONE_NEW* type, fd) pairs; before 25.11 the one fd is the
        mount namespace (CLONE_NEWNS)."""
        if self.version < V25_11:
            self._request(_REQUEST_GET_NS_FD)
            # The sender's fd number, only as "is one coming": > 0 yes, 0 no job container
            # (what 22.05.8 answers without JobContainerType, checked in the lab), -1 the
            # plugin failed, which pam_slurm_adopt counts as an adoption failure.
            sent = self._read_int("REQUEST_GET_NS_FD")
            if sent < 0:
                raise self._fail("REQUEST_GET_NS_FD: the job container plugin could not "
                                 "open the job's namespace")
            if sent == 0:
                return []
            return [(_CLONE_NEWNS, self._recv_fd("REQUEST_GET_NS_FD"))]
        self._request(_REQUEST_GET_NS_FDS)
        count = self._read_int("REQUEST_GET_NS_FDS")
        if not 0 <= count <= _MAX_NS_FDS:
            raise self._fail(f"protocol error: REQUEST_GET_NS_FDS says {count} fds")
        got: list[tuple[int, int]] = []
        try:
            for _ in range(count):
                kind = self._read_int("REQUEST_GET_NS_FDS")
                got.append((kind, self._recv_fd("REQUEST_GET_NS_FDS")))
        except BaseException:
            for _kind, fd in got:
                os.close(fd)
            raise
        return got

    # -- the connection ----------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Stepd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else version_name(getattr(self, "version", 0))
        return f"<Stepd {self.path} {state}>"

    # -- bytes with deadlines ----------------------------------------------------------

    def _fail(self, message: str, err: int | None = None) -> StepdError:
        """Close the connection and make the error to raise: after a failure mid-request
        the stream's position is unknown."""
        self.close()
        return StepdError(self.path, message, err)

    def _live(self) -> socket.socket:
        """The socket with the remaining time of this call as its timeout."""
        if self._sock is None:
            raise StepdError(self.path, "connection closed (after an earlier error)")
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._fail(f"no answer within {self.timeout:g} s", errno.ETIMEDOUT)
        self._sock.settimeout(remaining)
        return self._sock

    def _request(self, opcode: int, fields: bytes = b"") -> None:
        """Start a call: its own deadline, then the opcode and fields in one write."""
        self._deadline = time.monotonic() + self.timeout
        self._send(_INT.pack(opcode) + fields)

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._live().send(view)
            except TimeoutError:
                raise self._fail(f"write timed out after {self.timeout:g} s",
                                 errno.ETIMEDOUT) from None
            except OSError as exc:   # EPIPE, ECONNRESET: the stepd hung up
                raise self._fail(f"write failed: {exc.strerror or exc}", exc.errno) from exc
            view = view[sent:]

    def _recv_exact(self, size: int, what: str) -> bytes:
        """Exactly *size* bytes (short reads looped) before the call's deadline."""
        chunks: list[bytes] = []
        got = 0
        while got < size:
            try:
                chunk = self._live().recv(min(size - got, 65536))
            except TimeoutError:
                raise self._fail(f"no answer to {what} within {self.timeout:g} s",
                                 errno.ETIMEDOUT) from None
            except OSError as exc:
                raise self._fail(f"read failed ({what}): {exc.strerror or exc}",
                                 exc.errno) from exc
            if not chunk:
                self.close()
                # _HungUp: add_extern_pid tells a 25.11+ refusal (no reply at all) by it.
                kind = _HungUp if got == 0 else StepdError
                raise kind(self.path, f"closed the connection during the answer to {what} "
                           f"({got} of {size} bytes)", errno.ECONNRESET)
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _read_int(self, what: str) -> int:
        return int(_INT.unpack(self._recv_exact(4, what))[0])

    def _read_uint(self, what: str) -> int:
        return int(_UINT.unpack(self._recv_exact(4, what))[0])

    def _recv_fd(self, what: str) -> int:
        """One fd sent with SCM_RIGHTS on a one-byte message (fd.c send_fd_over_socket,
        send_fd_over_pipe before 24.11)."""
        fds = array.array("i")
        try:
            data, ancdata, flags, _addr = self._live().recvmsg(
                1, socket.CMSG_SPACE(fds.itemsize), socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            raise self._fail(f"no fd for {what} within {self.timeout:g} s",
                             errno.ETIMEDOUT) from None
        except OSError as exc:
            raise self._fail(f"receiving an fd ({what}): {exc.strerror or exc}",
                             exc.errno) from exc
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if not data or len(fds) != 1 or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            if not data:
                raise self._fail(f"closed the connection before the fd of {what}",
                                 errno.ECONNRESET)
            raise self._fail(f"protocol error: {len(fds)} fds with {what} (expected 1)")
        return int(fds[0])
