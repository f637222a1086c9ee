"""Fakes for unit tests of node_agent (never used outside tests/)."""

from __future__ import annotations

import base64
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from callerid import CgroupError, Job, ProcCgroup
from node_agent.auth import Identity
from node_agent.errors import AuthError, JobNotFound
from node_agent.jobs.base import JobCgroup, JobRecord


class FakeAuthenticator:
    """A MUNGE stand-in: the credential names the uid in clear, decoding twice fails
    like munged's replay check, and a credential restricted to a uid decodes only for an
    authenticator of that uid (MUNGE_OPT_UID_RESTRICTION). `as_uid` makes the
    authenticator of a process of that uid, sharing one "munged"."""

    def __init__(self, uid: int = 0, gid: int = 0) -> None:
        self.uid = uid
        self.gid = gid
        self._seen: set[str] = set()
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def as_uid(self, uid: int, gid: int | None = None) -> FakeAuthenticator:
        other = FakeAuthenticator(uid, uid if gid is None else gid)
        other._seen = self._seen  # one "munged" for everybody
        other._counter = self._counter
        other._lock = self._lock
        return other

    def encode(self, payload: bytes, *, restrict_uid: int | None = None,
               ttl: int | None = None) -> str:
        with self._lock:
            n = next(self._counter)
        only = "" if restrict_uid is None else str(restrict_uid)
        return f"FAKE:{self.uid}:{self.gid}:{n}:{only}:{base64.b64encode(payload).decode()}"

    def decode(self, credential: str) -> tuple[Identity, bytes]:
        try:
            tag, uid, gid, _n, only, payload = credential.split(":")
            assert tag == "FAKE"
            ident = Identity(int(uid), int(gid))
            data = base64.b64decode(payload)
            restricted = int(only) if only else None
        except (ValueError, AssertionError):
            raise AuthError("MUNGE decode failed: Invalid credential format") from None
        if restricted is not None and restricted != self.uid:
            raise AuthError("MUNGE decode failed: Unauthorized credential decode")
        with self._lock:
            if credential in self._seen:
                raise AuthError("MUNGE decode failed: Replayed credential", replayed=True)
            self._seen.add(credential)
        return ident, data


class FakeCgroup:
    """A `JobCgroup` in memory: what was done to it is recorded in `ops`."""

    def __init__(self, name: str, ops: list[tuple[str, str]], *, job_alive: bool = True,
                 node: str = "fake") -> None:
        self.name, self.ops, self.job_alive, self.node = name, ops, job_alive, node
        self.made = False
        self.pids: set[int] = set()

    def __str__(self) -> str:
        return self.name

    def create(self) -> list[str]:
        if not self.job_alive:
            raise JobNotFound(self.name.split("/")[0], self.node)
        self.ops.append(("create", self.name))
        self.made = True
        return [f"/fake/{self.name}/cgroup.procs"]

    def join(self) -> list[str]:
        if not self.made:
            raise CgroupError(f"{self.name} is gone")
        return [f"/fake/{self.name}/cgroup.procs"]

    def enroll(self, pid: int) -> None:
        self.ops.append(("enroll", self.name))

    def exists(self) -> bool:
        return self.made

    def procs(self) -> set[int]:
        return set(self.pids)

    def kill(self, timeout: float) -> int:
        self.ops.append(("kill", self.name))
        killed, self.pids = len(self.pids), set()
        return killed

    def remove(self) -> None:
        self.ops.append(("remove", self.name))
        self.made = False


class FakeBackend:
    """A `JobBackend` in memory, for unit tests of the daemon's parts: jobs are added with
    `add`; adoptions and cgroup operations are recorded (`adopted`, `ops`). It is not a
    `JobControl`: like a scheduler's backend, it neither starts nor ends jobs."""

    def __init__(self, node: str = "fake") -> None:
        self.node = node
        self.jobs: dict[str, JobRecord] = {}
        self.job_pids: dict[str, list[int]] = {}
        self.env: dict[str, dict[str, str]] = {}
        self.cgroups: dict[str, FakeCgroup] = {}
        self.adopted: list[tuple[str, int]] = []
        self.ops: list[tuple[str, str]] = []
        self.adopt_error: OSError | None = None
        # namespaces(): (kind, path) of each one a job's opens; what it raises instead
        self.ns: dict[str, list[tuple[str, str]]] = {}
        self.ns_error: OSError | None = None
        self.ns_opened: list[int] = []

    def add(self, job_id: str, user: str, uid: int, *, state: str = "running",
            pids: Sequence[int] = (), env: Mapping[str, str] | None = None,
            start_time: float | None = None) -> JobRecord:
        job = Job(job_id, user, uid, uid, start_time or time.time(),
                  pids[0] if pids else None)
        rec = self.jobs[job_id] = JobRecord(job, state)
        self.job_pids[job_id] = list(pids)
        self.env[job_id] = dict(env or {})
        return rec

    def get(self, job_id: str) -> JobRecord | None:
        return self.jobs.get(job_id)

    def list_jobs(self, user: str | None = None) -> list[JobRecord]:
        return sorted((r for r in self.jobs.values() if user is None or r.job.user == user),
                      key=lambda r: (r.job.start_time, r.job.id))

    def pids(self, job_id: str) -> list[int]:
        return list(self.job_pids.get(job_id, []))

    def main_pid(self, job_id: str) -> int | None:
        pids = self.pids(job_id)
        return pids[0] if pids else None

    def environment(self, job_id: str) -> dict[str, str]:
        return dict(self.env.get(job_id, {}))

    def cgroup_names(self, job_id: str) -> list[str]:
        return [f"fake:/jobs/{job_id}"]

    why_not = ""

    def why_no_jobs(self) -> str:
        return self.why_not

    def newest(self, records: Sequence[JobRecord]) -> JobRecord:
        return max(records, key=lambda r: (r.job.start_time, r.job.id))

    def adopt(self, job_id: str, pid: int) -> None:
        if self.adopt_error is not None:
            raise self.adopt_error
        self.adopted.append((job_id, pid))

    def _cgroup(self, name: str, job_id: str | None) -> FakeCgroup:
        cg = self.cgroups.get(name)
        if cg is None:
            cg = self.cgroups[name] = FakeCgroup(name, self.ops, node=self.node)
        cg.job_alive = job_id is None or job_id in self.jobs
        return cg

    def session_cgroup(self, job_id: str, session: str | None = None) -> FakeCgroup:
        return self._cgroup(f"{job_id}/sessions" + (f"/{session}" if session else ""), job_id)

    def helper_cgroup(self, name: str) -> FakeCgroup:
        return self._cgroup(f"helpers/{name}", None)

    def leftover_helper_cgroups(self) -> list[JobCgroup]:
        return [cg for name, cg in sorted(self.cgroups.items())
                if name.startswith("helpers/") and cg.made]

    def scratch_cgroups(self) -> str | None:
        return None

    def job_for_cgroup_id(self, cgroup_id: int) -> str | None:
        return None

    def job_for_proc_cgroups(self, entries: Sequence[ProcCgroup]) -> str | None:
        for e in entries:
            for job_id in self.jobs:
                if e.path.endswith(f"/jobs/{job_id}"):
                    return job_id
        return None

    def close(self) -> None:
        pass

    def namespaces(self, job_id: str) -> list[tuple[str, int]]:
        if self.ns_error is not None:
            raise self.ns_error
        got = [(kind, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
               for kind, path in self.ns.get(job_id, [])]
        self.ns_opened += [fd for _, fd in got]
        return got


# -- a fake slurmstepd ---------------------------------------------------------------------
# (node_agent.jobs.stepd's protocol, byte for byte as Slurm's req.c speaks it)

V22_05, V23_11, V25_11, V26_05 = 38 << 8, 40 << 8, 44 << 8, 45 << 8


def recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_int(conn: socket.socket) -> int:
    return int(struct.unpack("=i", recv_exact(conn, 4))[0])


def answer(data: bytes, *, delay: float = 0.0,
           keep: bool = True) -> Callable[[socket.socket], bool]:
    """A handler that waits *delay*, sends *data* and keeps (or drops) the connection."""
    def handler(conn: socket.socket) -> bool:
        time.sleep(delay)
        conn.sendall(data)
        return keep
    return handler


def send_fd(conn: socket.socket, fd: int) -> None:
    conn.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", fd))])


class FakeStepd:
    """One stepd: accepts connections, answers the handshake and the requests it knows.

    `version` is what it answers in the handshake; `min_version` the lowest client version
    it accepts (-1 and close below). `handlers` maps an opcode to a function answering it
    (return False to hang up). `silent` accepts and never answers. Records what it read."""

    def __init__(self, path: str, version: int = V22_05, min_version: int = 36 << 8) -> None:
        self.path = path
        self.version = version
        self.min_version = min_version
        self.silent = False
        self.client_versions: list[int] = []
        self.requests: list[tuple[int, int | None]] = []
        self.uid = 1001
        self.state = 2
        self.pids = [4242, 4243, 4244]
        self.container = {4242}
        self.extern_rc: int | None = 0
        self.ns: list[tuple[int, str]] = []      # (type, path to open and send)
        self.ns_failed = False                   # REQUEST_GET_NS_FD answers -1
        self.sluid = 0x1234_5678_9ABC
        self.handlers: dict[int, Callable[[socket.socket], bool]] = {
            5: lambda c: self._int(c, self.state),
            20: lambda c: self._raw(c, struct.pack("=I", self.uid)),
            15: self._list_pids,
            8: self._pid_in_container,
            9: lambda c: self._int(c, 777),
            22: self._add_extern_pid,
        }
        if version >= V25_11:
            self.handlers[1] = lambda c: self._raw(c, struct.pack("=Q", self.sluid))
            self.handlers[28] = self._get_ns_fds
        else:
            self.handlers[26] = self._get_ns_fd
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(8)
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _int(self, conn: socket.socket, value: int) -> bool:
        return self._raw(conn, struct.pack("=i", value))

    def _raw(self, conn: socket.socket, data: bytes) -> bool:
        conn.sendall(data)
        return True

    def _list_pids(self, conn: socket.socket) -> bool:
        conn.sendall(struct.pack(f"=I{len(self.pids)}I", len(self.pids), *self.pids))
        return True

    def _pid_in_container(self, conn: socket.socket) -> bool:
        pid = read_int(conn)
        self.requests[-1] = (8, pid)
        conn.sendall(struct.pack("=?", pid in self.container))
        return True

    def _add_extern_pid(self, conn: socket.socket) -> bool:
        pid = read_int(conn)
        self.requests[-1] = (22, pid)
        if self.extern_rc is None:      # 25.11+: refused by hanging up
            return False
        return self._int(conn, self.extern_rc)

    def _get_ns_fd(self, conn: socket.socket) -> bool:
        if self.ns_failed:
            return self._int(conn, -1)   # the job container plugin failed
        if not self.ns:
            return self._int(conn, 0)    # no job container (22.05.8, checked in the lab)
        fd = os.open(self.ns[0][1], os.O_RDONLY)
        try:
            self._int(conn, fd)          # the sender's own fd number, as 22.05 sends it
            send_fd(conn, fd)
        finally:
            os.close(fd)
        return True

    def _get_ns_fds(self, conn: socket.socket) -> bool:
        self._int(conn, len(self.ns))
        for kind, path in self.ns:
            fd = os.open(path, os.O_RDONLY)
            try:
                self._int(conn, kind)
                send_fd(conn, fd)
            finally:
                os.close(fd)
        return True

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            if self.silent:
                recv_exact(conn, 4)
                time.sleep(30)
                return
            client = read_int(conn)
            self.client_versions.append(client)
            if client < self.min_version:
                conn.sendall(struct.pack("=i", -1))
                return
            conn.sendall(struct.pack("=i", self.version))
            while True:
                opcode = read_int(conn)
                self.requests.append((opcode, None))
                handler = self.handlers.get(opcode)
                if handler is None or not handler(conn):
                    return            # unknown opcode or refusal: hang up, no reply
        except (EOFError, OSError):
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self._server.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
