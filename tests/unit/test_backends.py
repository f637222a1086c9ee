"""The job-backend seam: the daemon's parts work with any `JobBackend`.

The same admission decisions, gRPC answers and ssh-to-job clean-up, with the in-memory
FakeBackend (tests/unit/fakes.py) in place of the native registry; and the native
registry is a JobBackend and a JobControl.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from callerid import CgroupLayout, Hierarchy, ProcCgroup, Resolver
from node_agent.agent.admission import Admission, Peer
from node_agent.agent.server import create_server
from node_agent.agent.service import NodeAgentServicer
from node_agent.agent.sessions import JobShellSessions
from node_agent.client import AgentClient
from node_agent.jobs import JobBackend, JobControl, JobRecord
from node_agent.jobs.native import JobRegistry
from node_agent.pamcontract import ALLOW, DENY, Request
from node_agent.proto.v1 import agent_pb2 as pb
from tests.unit.fakes import FakeAuthenticator, FakeBackend

PEER = Peer(pid=4321, uid=0, gid=0)
SSH = "10.0.0.1 40000 10.0.0.2 22"


def request(user: str = "alice") -> Request:
    return Request(user=user, service="sshd", rhost="10.0.0.1", ssh_connection=SSH)


def test_the_native_registry_is_a_backend_that_controls_jobs(tmp_path: Path) -> None:
    reg = JobRegistry(tmp_path / "state", CgroupLayout([Hierarchy("unified", 2, tmp_path)],
                                                       "callerid"), node="n1")
    try:
        backend: JobBackend = reg   # the protocol, checked by mypy
        assert backend.node == "n1"
        assert isinstance(reg, JobControl)
        assert not isinstance(FakeBackend(), JobControl)
    finally:
        reg.close()


def test_admission_adopts_through_the_backend() -> None:
    jobs = FakeBackend("n2")
    jobs.add("7", "bob", 1002)
    jobs.add("42", "alice", 1001)
    r = Admission(jobs, lambda *a: None).decide(request(), PEER)
    assert (r.decision, r.reason, r.job_id) == (ALLOW, "one-job", "42")
    assert r.env["CALLERID_NODE"] == "n2"
    assert jobs.adopted == [("42", PEER.pid)]


def test_admission_skips_jobs_that_are_not_running() -> None:
    jobs = FakeBackend()
    jobs.add("42", "alice", 1001, state="ending")
    r = Admission(jobs, lambda *a: None).decide(request(), PEER)
    assert (r.decision, r.reason) == (DENY, "no-jobs")
    assert jobs.adopted == []


def test_a_no_jobs_refusal_says_what_rules_jobs_out() -> None:
    """A backend whose configuration rules out every job (Slurm without
    PrologFlags=contain) says so in the refusal's syslog detail."""
    jobs = FakeBackend()
    jobs.why_not = "slurm.conf has no PrologFlags=contain"
    jobs.add("42", "alice", 1001, state="ending")
    r = Admission(jobs, lambda *a: None).decide(request(), PEER)
    assert (r.decision, r.reason, r.detail) == (DENY, "no-jobs", jobs.why_not)
    r = Admission(FakeBackend(), lambda *a: None).decide(request(), PEER)
    assert (r.reason, r.detail) == ("no-jobs", "")


def test_a_backend_failing_to_adopt_is_an_adoption_failure() -> None:
    jobs = FakeBackend()
    jobs.add("42", "alice", 1001)
    jobs.adopt_error = OSError(28, "No space left on device")
    r = Admission(jobs, lambda *a: None).decide(request(), PEER)
    assert (r.decision, r.reason) == (DENY, "adopt-failed")
    assert "No space left on device" in r.detail


def test_the_caller_id_of_several_jobs_picks_the_backends_job() -> None:
    jobs = FakeBackend()
    jobs.add("A", "alice", 1001, start_time=1.0)
    jobs.add("B", "alice", 1001, start_time=2.0)
    asked: list[str] = []

    def caller_id(host: str, conn: object, deadline: float) -> str | None:
        asked.append(host)
        return "A"

    r = Admission(jobs, caller_id).decide(request(), PEER)
    assert (r.reason, r.job_id, asked) == ("caller-id", "A", ["10.0.0.1"])
    assert jobs.adopted == [("A", PEER.pid)]


def test_the_resolver_asks_the_backend_for_a_process_s_job() -> None:
    jobs = FakeBackend()
    jobs.add("42", "alice", 1001)
    entry = ProcCgroup(0, (), "/x/jobs/42")
    assert jobs.job_for_proc_cgroups([entry]) == "42"
    resolver = Resolver(jobs, use_netlink=False)   # accepted as its JobLocator
    resolver.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FakeBackend, AgentClient, AgentClient]]:
    jobs = FakeBackend("fakenode")
    jobs.add("42", "alice", 1001, pids=[500, 501])
    resolver = Resolver(jobs, use_netlink=False)
    servicer = NodeAgentServicer(node="fakenode", resolver=resolver, jobs=jobs)
    auth = FakeAuthenticator()
    server, ports = create_server(servicer, auth, ["127.0.0.1:0"], max_workers=4)
    server.start()
    target = f"127.0.0.1:{ports[0]}"
    root = AgentClient(target, auth.as_uid(0), timeout=5, local_node="fakenode")
    alice = AgentClient(target, auth.as_uid(1001), timeout=5, local_node="fakenode")
    try:
        yield jobs, root, alice
    finally:
        root.close()
        alice.close()
        server.stop(0)
        resolver.close()


def test_the_service_lists_the_backends_jobs(
        served: tuple[FakeBackend, AgentClient, AgentClient]) -> None:
    _, root, alice = served
    reply = alice.list_jobs(with_pids=True)
    assert reply.node == "fakenode"
    assert [(j.id, j.user, list(j.pids), list(j.cgroups)) for j in reply.jobs] == \
        [("42", "alice", [500, 501], ["fake:/jobs/42"])]


def test_a_backend_that_does_not_control_jobs_says_so(
        served: tuple[FakeBackend, AgentClient, AgentClient]) -> None:
    jobs, root, _ = served
    for call in (lambda: root.start_job("43", "alice"), lambda: root.attach("42", 1),
                 lambda: root.end_job("42")):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "started and ended by the scheduler" in (e.value.details() or "")
    assert set(jobs.jobs) == {"42"}


def test_sessions_clean_up_through_the_backend(tmp_path: Path) -> None:
    """What an earlier run left: the sessions' cgroup of a live job and a helper's cgroup
    are killed and removed through the backend's JobCgroup, nothing else touched."""
    jobs = FakeBackend()
    jobs.add("42", "alice", 1001, pids=[500, 600])
    left = jobs.session_cgroup("42")
    left.create()
    left.pids = {600}
    jobs.helper_cgroup("abc").create()
    sessions = JobShellSessions(jobs, tmp_path / "run", "n1")   # no session: no threads
    assert sessions.job_pids("42") == [500]    # the session's process is not the job's
    jobs.ops.clear()
    sessions.recover()
    assert jobs.ops == [("kill", "42/sessions"), ("remove", "42/sessions"),
                        ("kill", "helpers/abc"), ("remove", "helpers/abc")]


def test_a_session_in_an_ended_job_is_refused_by_the_backend() -> None:
    jobs = FakeBackend()
    with pytest.raises(Exception, match="no job 9"):
        jobs.session_cgroup("9", "s1").create()
    assert jobs.ops == []


def test_pb_job_carries_the_backends_node(
        served: tuple[FakeBackend, AgentClient, AgentClient]) -> None:
    _, root, _ = served
    (job,) = root.list_jobs(job_id="42").jobs
    assert isinstance(job, pb.Job) and job.node == "fakenode"


def test_newest_is_the_backends_rule() -> None:
    """A scheduler's "newest" is its own (Slurm: by version, cgroup mtime or job id):
    admission adopts into the job the backend names, not the latest start time."""

    class LowestId(FakeBackend):
        def newest(self, records: Sequence[JobRecord]) -> JobRecord:
            return min(records, key=lambda r: r.job.id)

    jobs = LowestId()
    jobs.add("A", "alice", 1001, start_time=1.0)
    jobs.add("B", "alice", 1001, start_time=2.0)
    r = Admission(jobs, lambda *a: None).decide(request(), PEER)   # action_unknown: newest
    assert (r.reason, r.job_id) == ("unknown-newest", "A")
    assert jobs.adopted == [("A", PEER.pid)]
