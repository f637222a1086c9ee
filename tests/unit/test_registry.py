"""The native job registry on a fake cgroup tree: persistence, reconciliation, races."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from callerid import CgroupLayout, Hierarchy
from node_agent.registry import JobRegistry


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CgroupLayout:
    import pwd as pwd_mod

    def getpwnam(name: str) -> pwd_mod.struct_passwd:
        return pwd_mod.struct_passwd((name, "x", 1001, 1001, "", "/home/x", "/bin/sh"))

    monkeypatch.setattr("node_agent.registry.pwd.getpwnam", getpwnam)
    hier = (Hierarchy("freezer", 1, tmp_path / "cg" / "freezer"),
            Hierarchy("unified", 2, tmp_path / "cg" / "unified"))
    for h in hier:
        h.mountpoint.mkdir(parents=True)
    return CgroupLayout(hier, "callerid")


def test_concurrent_ends_of_one_job_run_once(tmp_path: Path, layout: CgroupLayout,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    reg = JobRegistry(tmp_path / "state", layout, node="n")
    reg.recover()
    reg.start("42", "alice")
    kills = []

    def slow_kill(job_id: str, timeout: float = 10.0) -> int:
        kills.append(job_id)
        time.sleep(0.2)  # the watcher reports the main process's exit meanwhile
        return 1

    monkeypatch.setattr(layout, "kill", slow_kill)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        reg._finish("42", reason="test"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kills == ["42"]
    assert sorted(results) == [0, 0, 1]
    assert reg.get("42") is None and "42" not in layout.existing_jobs()
    reg.close()


def test_records_survive_and_orphans_are_reconciled(tmp_path: Path,
                                                     layout: CgroupLayout) -> None:
    reg = JobRegistry(tmp_path / "state", layout, node="n")
    reg.recover()
    reg.start("live", "alice")
    reg.start("gone", "alice")
    reg.close()
    # Behind the agent's back: "gone" lost its cgroups; an unknown empty job dir appeared.
    for h in layout.hierarchies:
        for p in sorted(layout.job_path(h, "gone").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        layout.job_path(h, "gone").rmdir()
    layout.create_job("stray")
    (layout.leaf_path(layout.hierarchies[1], "live") / "cgroup.procs").write_text("1\n")
    again = JobRegistry(tmp_path / "state", layout, node="n")
    again.recover()
    assert [r.job.id for r in again.list_jobs()] == ["live"]
    assert "stray" not in layout.existing_jobs()
    again.close()
