"""Job cgroups on fake cgroupfs trees (plain directories and files under tmp_path).

Never on the real /sys/fs/cgroup: creating, killing and removing real cgroups is the
integration tests' job, inside the lab. Signals are faked too (pids above pid_max).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from callerid import (
    CgroupConfig,
    CgroupError,
    CgroupLayout,
    Hierarchy,
    InvalidJobId,
    KernelFormatError,
    ProcCgroup,
    _cgroup,
)
from tests.unit.conftest import FakeCgroupFS, FakeProc

# Above the kernel's maximum pid_max (2**22): even if a fake failed, nothing real is hit.
FAKE_PIDS = (4_194_400, 4_194_401, 4_194_402)


@pytest.fixture
def hybrid(fake_cgroup: FakeCgroupFS, fake_proc: FakeProc) -> tuple[CgroupConfig, FakeProc]:
    """This machine's shape: v1 controllers (cpu,cpuacct co-mounted), name=systemd,
    cgroup2 at unified."""
    fake_cgroup.mount_v1("cpu,cpuacct", "cpu,cpuacct")
    fake_cgroup.mount_v1("freezer", "freezer")
    fake_cgroup.mount_v1("memory", "memory")
    fake_cgroup.mount_v1("systemd", "xattr,name=systemd")
    fake_cgroup.mount_v1("cpuset", "cpuset")
    fake_cgroup.mount_v2("unified")
    fake_proc.set_mountinfo(fake_cgroup.mountinfo())
    return CgroupConfig(mount_root=str(fake_cgroup.root)), fake_proc


@pytest.fixture
def layout(hybrid: tuple[CgroupConfig, FakeProc]) -> CgroupLayout:
    config, proc = hybrid
    return CgroupLayout.discover(config, proc.root)


# -- discover -------------------------------------------------------------------------------


def test_discover_hybrid_default(layout: CgroupLayout, fake_cgroup: FakeCgroupFS) -> None:
    assert layout.hierarchies == (
        Hierarchy("freezer", 1, fake_cgroup.root / "freezer"),
        Hierarchy("unified", 2, fake_cgroup.root / "unified"),
    )
    assert layout.subtree == "callerid"


def test_discover_comounted_named_and_cpuset(
    hybrid: tuple[CgroupConfig, FakeProc], fake_cgroup: FakeCgroupFS
) -> None:
    config, proc = hybrid
    config = CgroupConfig(
        mount_root=config.mount_root, v1=("cpuacct", "name=systemd", "cpuset"), v2=False
    )
    found = CgroupLayout.discover(config, proc.root)
    assert [(h.name, h.version, h.mountpoint.name) for h in found.hierarchies] == [
        ("cpuacct", 1, "cpu,cpuacct"),
        ("name=systemd", 1, "systemd"),
        ("cpuset", 1, "cpuset"),
    ]


def test_discover_pure_v2_at_mount_root(tmp_path: Path, fake_proc: FakeProc) -> None:
    root = tmp_path / "sys-fs-cgroup"
    root.mkdir()
    fake_proc.set_mountinfo(f"30 23 0:26 / {root} rw - cgroup2 cgroup2 rw,nsdelegate\n")
    found = CgroupLayout.discover(CgroupConfig(mount_root=str(root), v1=()), fake_proc.root)
    assert found.hierarchies == (Hierarchy("unified", 2, root),)


@pytest.mark.parametrize(
    ("v1", "v2", "message"),
    [
        (("blkio",), False, "cgroup v1 controller 'blkio' is not mounted under"),
        (("name=slurm",), False, "cgroup v1 named hierarchy 'name=slurm' is not mounted"),
        ((), True, r"cgroup v2 \(cgroup2\) is not mounted under"),
        ((), False, "no cgroup hierarchy configured"),
    ],
)
def test_discover_missing_hierarchy(
    fake_cgroup: FakeCgroupFS, fake_proc: FakeProc, v1: tuple[str, ...], v2: bool, message: str
) -> None:
    fake_cgroup.mount_v1("freezer", "freezer")
    fake_proc.set_mountinfo(fake_cgroup.mountinfo())
    config = CgroupConfig(mount_root=str(fake_cgroup.root), v1=v1, v2=v2)
    with pytest.raises(CgroupError, match=message) as info:
        CgroupLayout.discover(config, fake_proc.root)
    if v1 or v2:
        assert str(fake_cgroup.root) in str(info.value)


def test_discover_ignores_mounts_outside_mount_root(
    fake_cgroup: FakeCgroupFS, fake_proc: FakeProc, tmp_path: Path
) -> None:
    # The real host's /sys/fs/cgroup must never leak into a layout rooted elsewhere.
    fake_cgroup.mount_elsewhere(tmp_path / "elsewhere" / "unified", "cgroup2", "rw")
    fake_cgroup.mount_elsewhere(tmp_path / "elsewhere" / "freezer", "cgroup", "rw,freezer")
    fake_proc.set_mountinfo(fake_cgroup.mountinfo())
    with pytest.raises(CgroupError, match="freezer"):
        CgroupLayout.discover(CgroupConfig(mount_root=str(fake_cgroup.root)), fake_proc.root)


def test_discover_last_mount_wins_and_unescapes(
    fake_cgroup: FakeCgroupFS, fake_proc: FakeProc
) -> None:
    first = fake_cgroup.mount_v2("old unified")
    second = fake_cgroup.mount_v2("new unified")
    text = fake_cgroup.mountinfo()
    assert "\\040" in text
    fake_proc.set_mountinfo(text)
    found = CgroupLayout.discover(
        CgroupConfig(mount_root=str(fake_cgroup.root), v1=()), fake_proc.root
    )
    assert found.hierarchies[0].mountpoint == second != first


def test_discover_with_optional_fields_and_empty_source(
    fake_cgroup: FakeCgroupFS, fake_proc: FakeProc
) -> None:
    path = fake_cgroup.root / "freezer"
    path.mkdir()
    fake_proc.set_mountinfo(
        f"37 31 0:34 / {path} rw,relatime shared:14 master:3 - cgroup  rw,freezer\n"
    )
    config = CgroupConfig(mount_root=str(fake_cgroup.root), v2=False)
    assert CgroupLayout.discover(config, fake_proc.root).hierarchies[0].mountpoint == path


@pytest.mark.parametrize(
    "line", ["37 31 0:34 / /x rw shared:14 cgroup cgroup rw", "37 31 0:34 / /x rw - cgroup"]
)
def test_discover_malformed_mountinfo(fake_proc: FakeProc, line: str) -> None:
    path = fake_proc.set_mountinfo("22 1 0:21 / /proc rw - proc proc rw\n" + line + "\n")
    with pytest.raises(KernelFormatError) as info:
        CgroupLayout.discover(CgroupConfig(), fake_proc.root)
    assert (info.value.path, info.value.lineno) == (str(path), 2)


@pytest.mark.parametrize("subtree", ["", "/abs", "a/../b", "a//b", "..", "a b"])
def test_bad_subtree_rejected(subtree: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CgroupLayout([Hierarchy("unified", 2, tmp_path)], subtree)


def test_two_v2_hierarchies_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CgroupLayout([Hierarchy("unified", 2, tmp_path), Hierarchy("u2", 2, tmp_path)], "x")


# -- paths and ids -------------------------------------------------------------------------


def test_job_and_leaf_paths(layout: CgroupLayout, fake_cgroup: FakeCgroupFS) -> None:
    v1, v2 = layout.hierarchies
    assert layout.job_path(v1, "42") == fake_cgroup.root / "freezer/callerid/job_42"
    assert layout.leaf_path(v2, "42") == fake_cgroup.root / "unified/callerid/job_42/main"
    assert layout.leaf_path(v2, "42", "ssh_7").name == "ssh_7"
    with pytest.raises(ValueError):
        layout.leaf_path(v2, "42", "../../x")


@pytest.mark.parametrize("job_id", ["../x", "a/b", "x" * 4096, "a\x00b", "", "."])
def test_hostile_ids_touch_nothing(
    layout: CgroupLayout, fake_cgroup: FakeCgroupFS, job_id: str
) -> None:
    before = sorted(p for p in fake_cgroup.root.rglob("*"))
    for op in (
        lambda: layout.create_job(job_id),
        lambda: layout.attach(job_id, FAKE_PIDS[0]),
        lambda: layout.remove(job_id),
        lambda: layout.procs(job_id),
        lambda: layout.kill(job_id, timeout=0.1),
        lambda: layout.job_path(layout.hierarchies[0], job_id),
    ):
        with pytest.raises(InvalidJobId):
            op()
    assert sorted(p for p in fake_cgroup.root.rglob("*")) == before


# -- create / attach / procs / existing / remove ---------------------------------------------


def test_create_job_in_every_hierarchy_idempotent(
    layout: CgroupLayout, fake_cgroup: FakeCgroupFS
) -> None:
    layout.create_job("42", leaves=("main", "ssh_1"))
    layout.create_job("42", leaves=("main", "ssh_1"))  # idempotent
    for mount in ("freezer", "unified"):
        job = fake_cgroup.root / mount / "callerid" / "job_42"
        assert sorted(p.name for p in job.iterdir()) == ["main", "ssh_1"]
    assert not (fake_cgroup.root / "memory" / "callerid").exists()  # not configured
    assert layout.existing_jobs() == {"42"}


def test_create_job_nested_subtree(tmp_path: Path) -> None:
    mount = tmp_path / "unified"
    mount.mkdir()
    lay = CgroupLayout([Hierarchy("unified", 2, mount)], "lab/node1/callerid")
    lay.create_job("7")
    assert (mount / "lab/node1/callerid/job_7/main").is_dir()


def test_create_job_unmounted_hierarchy(tmp_path: Path) -> None:
    lay = CgroupLayout([Hierarchy("freezer", 1, tmp_path / "missing")], "callerid")
    with pytest.raises(CgroupError, match="not mounted"):
        lay.create_job("1")


def test_create_job_v1_cpuset_copies_parent_masks(tmp_path: Path) -> None:
    # A new v1 cpuset is unusable until cpuset.cpus/mems are set (ENOSPC on attach).
    mount = tmp_path / "cpuset"
    mount.mkdir()
    (mount / "cpuset.cpus").write_text("0-1\n")
    (mount / "cpuset.mems").write_text("0\n")
    lay = CgroupLayout([Hierarchy("cpuset", 1, mount)], "callerid")
    lay.create_job("42")
    for d in ("callerid", "callerid/job_42", "callerid/job_42/main"):
        assert (mount / d / "cpuset.cpus").read_text() == "0-1\n"
        assert (mount / d / "cpuset.mems").read_text() == "0\n"


def test_create_job_v2_controllers(tmp_path: Path) -> None:
    mount = tmp_path / "unified"
    mount.mkdir()
    lay = CgroupLayout([Hierarchy("unified", 2, mount)], "callerid", v2_controllers=("pids",))
    sub = mount / "callerid"
    sub.mkdir()
    # What the parent delegates to our subtree (the kernel fills cgroup.controllers).
    (sub / "cgroup.controllers").write_text("cpu pids\n")
    lay.create_job("42")
    assert (sub / "cgroup.subtree_control").read_text() == "+pids"
    assert (sub / "job_42" / "cgroup.subtree_control").read_text() == "+pids"
    assert not (sub / "job_42" / "main" / "cgroup.subtree_control").exists()  # leaves: none
    # Idempotent: already enabled is not written again.
    (sub / "cgroup.subtree_control").write_text("pids\n")
    lay.create_job("42")
    assert (sub / "cgroup.subtree_control").read_text() == "pids\n"


def test_create_job_v2_controller_not_delegated(tmp_path: Path) -> None:
    mount = tmp_path / "unified"
    (mount / "callerid").mkdir(parents=True)
    (mount / "callerid" / "cgroup.controllers").write_text("pids\n")
    lay = CgroupLayout([Hierarchy("unified", 2, mount)], "callerid", v2_controllers=("cpu",))
    with pytest.raises(CgroupError, match="cpu not available") as info:
        lay.create_job("42")
    assert info.value.path == str(mount / "callerid")
    assert not (mount / "callerid" / "job_42").exists()


def test_attach_writes_pid_in_every_hierarchy(
    layout: CgroupLayout, fake_cgroup: FakeCgroupFS
) -> None:
    layout.create_job("42")
    layout.attach("42", FAKE_PIDS[0])
    layout.attach("42", FAKE_PIDS[1], leaf="ssh_2")  # leaf created on demand
    for mount in ("freezer", "unified"):
        job = fake_cgroup.root / mount / "callerid" / "job_42"
        assert (job / "main" / "cgroup.procs").read_text() == f"{FAKE_PIDS[0]}\n"
        assert (job / "ssh_2" / "cgroup.procs").read_text() == f"{FAKE_PIDS[1]}\n"
    assert layout.procs("42") == {FAKE_PIDS[0], FAKE_PIDS[1]}


def test_attach_to_missing_job(layout: CgroupLayout) -> None:
    with pytest.raises(CgroupError, match="job 99 has no cgroup"):
        layout.attach("99", FAKE_PIDS[0])


@pytest.mark.parametrize("pid", [0, -1, True, "123"])
def test_attach_rejects_bad_pids(layout: CgroupLayout, pid: object) -> None:
    layout.create_job("42")
    with pytest.raises(ValueError):
        layout.attach("42", pid)  # type: ignore[arg-type]


def test_attach_failure_is_a_cgroup_error(layout: CgroupLayout, fake_cgroup: FakeCgroupFS) -> None:
    layout.create_job("42")
    procs = fake_cgroup.root / "unified" / "callerid" / "job_42" / "main" / "cgroup.procs"
    procs.mkdir()  # writing it now fails with EISDIR, like any kernel refusal would
    with pytest.raises(CgroupError, match=f"cannot move pid {FAKE_PIDS[0]}") as info:
        layout.attach("42", FAKE_PIDS[0])
    assert info.value.errno == errno.EISDIR
    assert info.value.path == str(procs)
    assert isinstance(info.value, OSError)


def test_procs_missing_and_malformed(layout: CgroupLayout, fake_cgroup: FakeCgroupFS) -> None:
    assert layout.procs("42") == set()  # no such job anywhere: empty, not an error
    layout.create_job("42")
    procs = fake_cgroup.root / "freezer" / "callerid" / "job_42" / "main" / "cgroup.procs"
    procs.write_text("12\nnot-a-pid\n")
    with pytest.raises(KernelFormatError) as info:
        layout.procs("42")
    assert (info.value.lineno, info.value.line) == (2, "not-a-pid")


def test_existing_jobs_across_hierarchies(layout: CgroupLayout, fake_cgroup: FakeCgroupFS) -> None:
    assert layout.existing_jobs() == set()  # no subtree yet
    layout.create_job("1")
    (fake_cgroup.root / "freezer" / "callerid" / "job_2").mkdir()  # only in v1
    (fake_cgroup.root / "unified" / "callerid" / "job_3").mkdir()  # only in v2
    (fake_cgroup.root / "unified" / "callerid" / "job_..").mkdir()  # not ours: invalid id
    (fake_cgroup.root / "unified" / "callerid" / "job_4").write_text("")  # a file
    (fake_cgroup.root / "unified" / "callerid" / "other").mkdir()
    assert layout.existing_jobs() == {"1", "2", "3"}


def test_remove_depth_first_and_idempotent(layout: CgroupLayout, fake_cgroup: FakeCgroupFS) -> None:
    layout.create_job("42", leaves=("main", "ssh_1"))
    (fake_cgroup.root / "unified/callerid/job_42/ssh_1/nested").mkdir()
    layout.create_job("43")
    layout.remove("42")
    layout.remove("42")  # already gone: fine
    for mount in ("freezer", "unified"):
        assert not (fake_cgroup.root / mount / "callerid" / "job_42").exists()
        assert (fake_cgroup.root / mount / "callerid" / "job_43").is_dir()
    assert layout.existing_jobs() == {"43"}


def test_remove_busy_is_a_cgroup_error(layout: CgroupLayout, fake_cgroup: FakeCgroupFS) -> None:
    layout.create_job("42")
    # A plain file stands for a member process: rmdir fails as it would with EBUSY.
    (fake_cgroup.root / "unified/callerid/job_42/main/cgroup.procs").write_text("1\n")
    with pytest.raises(CgroupError, match="cannot remove cgroup") as info:
        layout.remove("42")
    assert info.value.errno == errno.ENOTEMPTY
    assert info.value.path == str(fake_cgroup.root / "unified/callerid/job_42/main")


# -- mapping back to jobs --------------------------------------------------------------------


def test_job_for_cgroup_id_is_the_directory_inode(
    layout: CgroupLayout, fake_cgroup: FakeCgroupFS
) -> None:
    unified = fake_cgroup.root / "unified" / "callerid"
    layout.create_job("42", leaves=("main", "ssh_1"))
    main = os.stat(unified / "job_42" / "main").st_ino
    job = os.stat(unified / "job_42").st_ino
    assert layout.job_for_cgroup_id(main) == "42"
    assert layout.job_for_cgroup_id(job) == "42"
    assert layout.job_for_cgroup_id(os.stat(unified / "job_42" / "ssh_1").st_ino) == "42"
    assert layout.job_for_cgroup_id(os.stat(unified).st_ino) is None  # the subtree itself
    # The freezer (v1) dirs are not v2 cgroups: their inodes are no cgroup ids.
    v1_ino = os.stat(fake_cgroup.root / "freezer/callerid/job_42/main").st_ino
    assert layout.job_for_cgroup_id(v1_ino) is None
    assert layout.job_for_cgroup_id(0) is None
    (unified / "job_a..b").mkdir()  # not a valid id: not one of our jobs
    assert layout.job_for_cgroup_id(os.stat(unified / "job_a..b").st_ino) is None
    # A new job is found (the cache is refreshed on a miss) ...
    layout.create_job("43")
    assert layout.job_for_cgroup_id(os.stat(unified / "job_43" / "main").st_ino) == "43"
    # ... and a removed one is not reported from the cache.
    layout.remove("42")
    assert layout.job_for_cgroup_id(main) is None


def test_job_for_cgroup_id_cache_hit_is_rechecked(
    layout: CgroupLayout, fake_cgroup: FakeCgroupFS
) -> None:
    unified = fake_cgroup.root / "unified" / "callerid"
    layout.create_job("42")
    main = os.stat(unified / "job_42" / "main").st_ino
    assert layout.job_for_cgroup_id(main) == "42"
    # Removed behind the layout's back (another process, the scheduler's epilog).
    (unified / "job_42" / "main").rmdir()
    (unified / "job_42").rmdir()
    assert layout.job_for_cgroup_id(main) is None


def test_job_for_cgroup_id_without_v2(tmp_path: Path) -> None:
    (tmp_path / "freezer").mkdir()
    lay = CgroupLayout([Hierarchy("freezer", 1, tmp_path / "freezer")], "callerid")
    lay.create_job("42")
    ino = os.stat(tmp_path / "freezer/callerid/job_42/main").st_ino
    assert lay.job_for_cgroup_id(ino) is None


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([ProcCgroup(0, (), "/callerid/job_42/main")], "42"),
        ([ProcCgroup(0, (), "/callerid/job_42")], "42"),
        ([ProcCgroup(6, ("freezer",), "/callerid/job_7/ssh_1")], "7"),
        ([ProcCgroup(12, ("name=systemd",), "/"), ProcCgroup(0, (), "/callerid/job_9/x")], "9"),
        # Not a configured hierarchy: memory is not used by this layout.
        ([ProcCgroup(4, ("memory",), "/callerid/job_42/main")], None),
        # Other subtree, Slurm's own tree, a prefix that only looks alike, hostile ids.
        ([ProcCgroup(0, (), "/other/job_42/main")], None),
        ([ProcCgroup(6, ("freezer",), "/slurm_n1/uid_1000/job_42/step_extern")], None),
        ([ProcCgroup(0, (), "/callerid2/job_42")], None),
        ([ProcCgroup(0, (), "/callerid/job_../x")], None),
        ([ProcCgroup(0, (), "/callerid/job_")], None),
        ([ProcCgroup(0, (), "/callerid/jobs_42")], None),
        ([ProcCgroup(0, (), "/")], None),
        ([], None),
    ],
)
def test_job_for_proc_cgroups(
    layout: CgroupLayout, entries: list[ProcCgroup], expected: str | None
) -> None:
    assert layout.job_for_proc_cgroups(entries) == expected


def test_job_for_proc_cgroups_comounted_v1(tmp_path: Path) -> None:
    lay = CgroupLayout([Hierarchy("cpuacct", 1, tmp_path)], "callerid")
    assert lay.job_for_proc_cgroups([ProcCgroup(2, ("cpu", "cpuacct"), "/callerid/job_5")]) == "5"
    assert lay.job_for_proc_cgroups([ProcCgroup(0, (), "/callerid/job_5")]) is None


# -- kill (signals and freezer faked) --------------------------------------------------------


class FakeKernel:
    """os.kill stand-in: records signals and empties the fake cgroup.procs files that
    list the pid, as the kernel would once the process is dead."""

    def __init__(self, root: Path, survivors: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.root = root
        self.survivors = survivors
        self.signals: list[tuple[int, int]] = []

    def kill(self, pid: int, sig: int) -> None:
        assert pid in FAKE_PIDS, f"refusing to signal a real pid {pid}"
        self.signals.append((pid, sig))
        if pid in self.survivors:
            return
        for procs in self.root.rglob("cgroup.procs"):
            lines = [ln for ln in procs.read_text().splitlines() if ln.strip() != str(pid)]
            procs.write_text("".join(f"{ln}\n" for ln in lines))


def job_42_in(tmp_path: Path, name: str, version: int = 1) -> tuple[CgroupLayout, Path]:
    """A layout over one (fake) hierarchy mounted at tmp_path/name, with job 42 created."""
    mount = tmp_path / name
    mount.mkdir()
    lay = CgroupLayout([Hierarchy(name, version, mount)], "callerid")
    lay.create_job("42")
    return lay, mount


def test_kill_v1_freezer_freezes_kills_thaws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay, mount = job_42_in(tmp_path, "freezer")
    job = mount / "callerid" / "job_42"
    (job / "freezer.state").write_text("THAWED\n")
    lay.attach("42", FAKE_PIDS[0])
    lay.attach("42", FAKE_PIDS[1], leaf="ssh_1")
    fake = FakeKernel(mount)
    states: list[str] = []

    def kill(pid: int, sig: int) -> None:
        states.append((job / "freezer.state").read_text())  # state while signalling
        fake.kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    assert lay.kill("42", timeout=2) == 2
    assert sorted(fake.signals) == [(FAKE_PIDS[0], signal.SIGKILL), (FAKE_PIDS[1], signal.SIGKILL)]
    assert states == ["FROZEN", "FROZEN"]  # killed while frozen: no fork escapes
    assert (job / "freezer.state").read_text() == "THAWED"  # never left frozen
    assert lay.procs("42") == set()


def test_kill_leaf_swept_while_freezing_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The whole job ends (and its tree is removed) while one ssh-to-job session's own
    # cleanup is freezing its leaf: the leaf's freezer.state vanishes under the loop.
    lay, mount = job_42_in(tmp_path, "freezer")
    lay.attach("42", FAKE_PIDS[1], leaf="ssh-to-job/s1")
    leaf = mount / "callerid" / "job_42" / "ssh-to-job" / "s1"
    (leaf / "freezer.state").write_text("THAWED\n")
    real_write_state = _cgroup._write_state

    def write_state(path: Path, state: str) -> None:
        real_write_state(path, state)
        if state == "FROZEN":
            path.write_text("FREEZING\n")  # the kernel has not stopped every task yet

    def sweep(_: float) -> None:  # the job's end removes the tree meanwhile
        shutil.rmtree(mount / "callerid" / "job_42")

    monkeypatch.setattr(_cgroup, "_write_state", write_state)
    monkeypatch.setattr(time, "sleep", sweep)  # the one _cgroup.kill waits with
    fake = FakeKernel(mount)
    monkeypatch.setattr(os, "kill", fake.kill)
    assert lay.kill("42", timeout=2, leaf="ssh-to-job/s1") == 0
    assert fake.signals == []
    assert lay.procs("42", leaf="ssh-to-job/s1") == set()


def test_kill_v2_uses_cgroup_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lay, mount = job_42_in(tmp_path, "unified", 2)
    job = mount / "callerid" / "job_42"
    (job / "cgroup.kill").write_text("")
    lay.attach("42", FAKE_PIDS[0])
    procs = job / "main" / "cgroup.procs"
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        n = real_write(fd, data)
        if data == b"1" and (job / "cgroup.kill").read_text() == "1":
            procs.write_text("")  # the kernel kills the whole subtree at once
        return n

    monkeypatch.setattr(os, "write", write)
    fake = FakeKernel(mount)
    monkeypatch.setattr(os, "kill", fake.kill)
    assert lay.kill("42", timeout=2) == 1
    assert (job / "cgroup.kill").read_text() == "1"
    assert fake.signals == []  # cgroup.kill did it all


def test_kill_without_freezer_loops_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay, mount = job_42_in(tmp_path, "pids")
    lay.attach("42", FAKE_PIDS[2])
    fake = FakeKernel(mount)
    monkeypatch.setattr(os, "kill", fake.kill)
    assert lay.kill("42", timeout=2) == 1
    assert fake.signals == [(FAKE_PIDS[2], signal.SIGKILL)]


def test_kill_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lay, mount = job_42_in(tmp_path, "pids")
    lay.attach("42", FAKE_PIDS[0])
    fake = FakeKernel(mount, survivors={FAKE_PIDS[0]})  # stuck in D state, say
    monkeypatch.setattr(os, "kill", fake.kill)
    with pytest.raises(CgroupError, match="still alive"):
        lay.kill("42", timeout=0.1)
    assert len(fake.signals) >= 2  # it kept trying


def test_kill_missing_job_is_a_no_op(layout: CgroupLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kill(pid: int, sig: int) -> None:
        raise AssertionError("nothing to kill")

    monkeypatch.setattr(os, "kill", no_kill)
    assert layout.kill("42", timeout=0.1) == 0


# -- nested leaves (one per ssh-to-job session) ---------------------------------------------

def test_nested_leaf_attach_kill_remove_leave_the_rest_of_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay, mount = job_42_in(tmp_path, "pids")
    lay.attach("42", FAKE_PIDS[0])
    lay.attach("42", FAKE_PIDS[1], leaf="ssh-to-job/s1")  # parents created on demand
    lay.attach("42", FAKE_PIDS[2], leaf="ssh-to-job/s2")
    job = mount / "callerid" / "job_42"
    assert (job / "ssh-to-job" / "s1" / "cgroup.procs").read_text() == f"{FAKE_PIDS[1]}\n"
    assert lay.procs("42", "ssh-to-job/s1") == {FAKE_PIDS[1]}
    assert lay.procs("42") == set(FAKE_PIDS[:3])
    fake = FakeKernel(mount)
    monkeypatch.setattr(os, "kill", fake.kill)
    assert lay.kill("42", timeout=2, leaf="ssh-to-job/s1") == 1
    assert fake.signals == [(FAKE_PIDS[1], signal.SIGKILL)]  # nobody else
    (job / "ssh-to-job" / "s1" / "cgroup.procs").unlink()  # the kernel's file, in a real fs
    lay.remove("42", leaf="ssh-to-job/s1")
    assert not (job / "ssh-to-job" / "s1").exists()
    assert (job / "ssh-to-job" / "s2").is_dir() and lay.procs("42") == {FAKE_PIDS[0],
                                                                          FAKE_PIDS[2]}


@pytest.mark.parametrize("leaf", ["", "a//b", "../x", "ssh-to-job/..", "/abs", "a/"])
def test_bad_nested_leaf_names(layout: CgroupLayout, leaf: str) -> None:
    layout.create_job("42")
    with pytest.raises(ValueError):
        layout.attach("42", FAKE_PIDS[0], leaf=leaf)
