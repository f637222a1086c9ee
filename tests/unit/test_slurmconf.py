"""node_agent.jobs.slurmconf on fake configuration files, fake spool dirs (real AF_UNIX
sockets) and cgroup paths of every layout, including those Slurm 22.05 cannot show here
(cgroup/v2, CgroupSlice, multiple slurmd, SLUID)."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.jobs import slurmconf as sc
from node_agent.jobs.slurmconf import SlurmNodeConfig, StepSocket


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


LAB_CONF = """\
# the lab's slurm.conf (LAB-NOTES), abridged
ClusterName=lab
SlurmctldHost=head
SlurmUser=slurm
SlurmdSpoolDir=/var/spool/slurmd/%n
ProctrackType=proctrack/cgroup
PrologFlags=contain
NodeName=DEFAULT CPUs=2 RealMemory=1000
NodeName=node1 NodeAddr=10.0.0.1
NodeName=node2 NodeAddr=10.0.0.2
PartitionName=debug Nodes=node[1-2] Default=YES
"""


# --- read_node_config --------------------------------------------------------------------

def test_lab_config_with_cgroup_conf(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", LAB_CONF)
    write(tmp_path / "cgroup.conf", "CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n"
          "CgroupMountpoint=/sys/fs/cgroup/\nConstrainCores=no\n")
    cfg = sc.read_node_config(str(conf), "node2", hostname="whatever")
    assert cfg.nodename == "node2"
    assert cfg.spool_dir == "/var/spool/slurmd/node2"
    assert cfg.prolog_contain is True
    assert cfg.proctrack == "proctrack/cgroup"
    assert cfg.cgroup_plugin == "cgroup/v1"
    assert cfg.cgroup_mountpoint == "/sys/fs/cgroup"     # trailing "/" dropped
    assert cfg.cgroup_prepend == "/slurm"
    assert cfg.slurm_user == "slurm"
    assert cfg.version is None
    assert cfg.multiple_slurmd is False
    assert cfg.files == (str(conf), str(tmp_path / "cgroup.conf"))


def test_defaults_without_cgroup_conf(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "NodeName=n1\n")
    cfg = sc.read_node_config(str(conf), hostname="n1", version=(22, 5))
    assert (cfg.nodename, cfg.spool_dir, cfg.prolog_contain, cfg.proctrack,
            cfg.cgroup_plugin, cfg.cgroup_mountpoint, cfg.slurm_user, cfg.version,
            cfg.cgroup_slice, cfg.cgroup_job_id_paths) == (
        "n1", "/var/spool/slurmd", False, "proctrack/cgroup", "autodetect",
        "/sys/fs/cgroup", "root", (22, 5), "system.slice", False)


def test_keys_case_insensitive_latest_wins_comments_quotes(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", (
        'slurmuser=first\n'
        'SLURMUSER=slurm   # a comment\n'
        'SlurmdSpoolDir="/var/spool/a dir/%h/x"  ProctrackType=proctrack/linuxproc\n'
        'prologflags=Alloc,X11\n'
        '# PrologFlags=nothing\n'
        'NodeName=n1\n'))
    cfg = sc.read_node_config(str(conf), hostname="n1.example.org")
    assert cfg.slurm_user == "slurm"
    assert cfg.spool_dir == "/var/spool/a dir/n1/x"     # %h: the short host name
    assert cfg.proctrack == "proctrack/linuxproc"
    assert cfg.prolog_contain is True                    # X11 implies Contain


@pytest.mark.parametrize(("flags", "contain"), [
    ("Contain", True), ("alloc,contain", True), ("x11", True), ("RunInJob", True),
    ("Alloc", False), ("NoHold,Serial", False), ("Alloc,SomeFutureFlag", False),
])
def test_prolog_flags(tmp_path: Path, flags: str, contain: bool) -> None:
    conf = write(tmp_path / "slurm.conf", f"PrologFlags={flags}\nNodeName=n1\n")
    assert sc.read_node_config(str(conf), "n1").prolog_contain is contain


def test_escaped_hash_and_continuation(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", (
        "SlurmdSpoolDir=/spool/a\\#b\n"
        "NodeName=n1 \\\n"
        "   NodeHostname=h1   # continued\n"))
    cfg = sc.read_node_config(str(conf), hostname="h1")
    assert cfg.spool_dir == "/spool/a#b"
    assert cfg.nodename == "n1" and cfg.node_hostname == "h1"


def test_include_relative_nested_and_cluster_name(tmp_path: Path) -> None:
    conf = write(tmp_path / "etc/slurm.conf",
                 "ClusterName=Lab\nInclude nodes.conf\ninclude /ABS\n".replace(
                     "/ABS", str(tmp_path / "abs.conf")))
    write(tmp_path / "etc/nodes.conf", "NodeName=n[1-2]\nINCLUDE sub/%c.conf\n")
    write(tmp_path / "etc/sub/lab.conf", "SlurmUser=fromsub\n")
    write(tmp_path / "abs.conf", "SlurmdSpoolDir=/abs/%n\n")
    cfg = sc.read_node_config(str(conf), hostname="n2")
    assert (cfg.nodename, cfg.slurm_user, cfg.spool_dir) == ("n2", "fromsub", "/abs/n2")
    assert cfg.files == (str(tmp_path / "etc/slurm.conf"), str(tmp_path / "etc/nodes.conf"),
                         str(tmp_path / "etc/sub/lab.conf"), str(tmp_path / "abs.conf"))


def test_missing_include_names_file_and_line(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "NodeName=n1\n\nInclude gone.conf\n")
    with pytest.raises(ValueError, match=r"slurm\.conf:3: Include .*gone\.conf"):
        sc.read_node_config(str(conf), "n1")


def test_include_loop_is_an_error(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "NodeName=n1\nInclude slurm.conf\n")
    with pytest.raises(ValueError, match="nested more than"):
        sc.read_node_config(str(conf), "n1")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nope\.conf: cannot read"):
        sc.read_node_config(str(tmp_path / "nope.conf"), "n1")


def test_garbage_line_names_file_and_line(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "NodeName=n1\nthis is not a setting\n")
    with pytest.raises(ValueError, match=r"slurm\.conf:2: cannot parse 'this is not"):
        sc.read_node_config(str(conf), "n1")


@pytest.mark.parametrize(("text", "match"), [
    ("CgroupPlugin=cgroup/v3\n", r"cgroup\.conf:1: CgroupPlugin='cgroup/v3'"),
    ("\nCgroupJobIdPaths=maybe\n", r"cgroup\.conf:2: CgroupJobIdPaths='maybe'"),
])
def test_bad_cgroup_conf_value(tmp_path: Path, text: str, match: str) -> None:
    conf = write(tmp_path / "slurm.conf", "NodeName=n1\n")
    write(tmp_path / "cgroup.conf", text)
    with pytest.raises(ValueError, match=match):
        sc.read_node_config(str(conf), "n1")


def test_cgroup_conf_v2_keys(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "NodeName=n1\n")
    write(tmp_path / "cgroup.conf", "cgroupplugin=cgroup/v2\nCgroupSlice=slurm.slice\n"
          "CgroupJobIdPaths=YES\nCgroupMountpoint=/cg\n")
    cfg = sc.read_node_config(str(conf), "n1")
    assert (cfg.cgroup_plugin, cfg.cgroup_slice, cfg.cgroup_job_id_paths,
            cfg.cgroup_mountpoint) == ("cgroup/v2", "slurm.slice", True, "/cg")


def test_node_by_hostname_hostlists_and_nodehostname(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", (
        "NodeName=cn[01-03],gpu7 NodeHostname=host[1-3],g7 CPUs=4\n"
        "NodeName=login NodeHostname=localhost\n"))
    assert sc.read_node_config(str(conf), hostname="host2.cluster").nodename == "cn02"
    assert sc.read_node_config(str(conf), hostname="g7").nodename == "gpu7"
    # Neither the short nor the full name: slurmd's last try is "localhost".
    assert sc.read_node_config(str(conf), hostname="elsewhere").nodename == "login"
    # The NodeName itself is not a host name when NodeHostname is given.
    with pytest.raises(ValueError, match="no NodeName has NodeHostname cn01"):
        sc.read_node_config(str(write(tmp_path / "b/slurm.conf",
                                      "NodeName=cn01 NodeHostname=host1\n")),
                            hostname="cn01")


def test_named_node_missing(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "NodeName=n[1-2]\n")
    with pytest.raises(ValueError, match="no NodeName n3"):
        sc.read_node_config(str(conf), "n3")


def test_no_node_lines(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "SlurmUser=slurm\nNodeName=DEFAULT CPUs=2\n")
    with pytest.raises(ValueError, match="no NodeName line"):
        sc.read_node_config(str(conf), "n1")


def test_fewer_hostnames_than_names_repeat_the_last(tmp_path: Path) -> None:
    # A multiple-slurmd build (the only one that accepts it) reuses the last NodeHostname.
    conf = write(tmp_path / "slurm.conf", "NodeName=n[1-3] NodeHostname=h1,box\n")
    assert sc.read_node_config(str(conf), "n3").node_hostname == "box"
    assert sc.read_node_config(str(conf), "n1").node_hostname == "h1"
    assert sc.read_node_config(str(conf), hostname="h1").nodename == "n1"


def test_multiple_slurmd(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", (
        "SlurmdSpoolDir=/spool/%n-%h-%n\n"
        "NodeName=v[1-2] NodeHostname=box Port=[17001-17002]\n"
        "NodeName=other\n"))
    with pytest.raises(ValueError, match="v1, v2 all have NodeHostname box"):
        sc.read_node_config(str(conf), hostname="box")
    cfg = sc.read_node_config(str(conf), "v2", hostname="box")
    assert cfg.multiple_slurmd is True
    assert cfg.cgroup_prepend == "/slurm_v2"
    assert cfg.spool_dir == "/spool/v2-box-%n"     # the first %n and %h only, as Slurm
    assert sc.read_node_config(str(conf), "other", hostname="box").multiple_slurmd is False


@pytest.mark.parametrize(("expr", "names"), [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[08-10,12]", ["n08", "n09", "n10", "n12"]),
    ("a,b[1-2]-ib,c", ["a", "b1-ib", "b2-ib", "c"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
])
def test_expand_hostlist(expr: str, names: list[str]) -> None:
    assert sc.expand_hostlist(expr) == names


@pytest.mark.parametrize("expr", ["n[1-", "n[a-b]", "n[3-1]", "n]1["])
def test_expand_hostlist_malformed(expr: str) -> None:
    with pytest.raises(ValueError):
        sc.expand_hostlist(expr)


# --- step_sockets ------------------------------------------------------------------------

@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fake spool dir; sockets are bound by relative name (cwd = the spool dir) so that
    a long tmp_path never hits the 108-byte sun_path limit."""
    d = tmp_path / "spool"
    d.mkdir()
    monkeypatch.chdir(d)
    yield d


def bind(spool: Path, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(name)
    assert (spool / name).is_socket()
    return s


def test_step_sockets(spool: Path) -> None:
    held = [bind(spool, n) for n in (
        "node1_12.4294967292", "node1_7.0", "node1_12.4294967291", "node1_7.0.1",
        "node1_7.0.0", "node2_5.4294967292", "node1_8.x", "node10_9.0",
        "node1_99999999999.0")]
    # Not sockets, or not stepd names: ignored.
    (spool / "node1_3.4294967292").write_text("a regular file")
    (spool / "node1_4.0").mkdir()
    (spool / "job00012").mkdir()
    (spool / "cred_state").write_text("")
    os.symlink("node1_7.0", spool / "node1_6.0")
    try:
        got = sc.step_sockets(str(spool), "node1")
    finally:
        for s in held:
            s.close()
    assert [(s.job_id, s.step_id, s.het) for s in got] == [
        (7, 0, None), (7, 0, 0), (7, 0, 1), (12, 4294967291, None), (12, 4294967292, None)]
    assert all(s.node == "node1" and s.path == str(spool / os.path.basename(s.path))
               for s in got)
    ext = got[-1]
    assert ext.is_extern and not ext.is_batch
    assert got[3].is_batch and not got[3].is_extern
    assert not got[0].is_extern and not got[0].is_batch


def test_step_sockets_node_name_is_literal(spool: Path) -> None:
    # Slurm builds a regex from the raw node name; a "." in it must not match any char.
    held = [bind(spool, "a.b_1.0"), bind(spool, "axb_2.0")]
    try:
        assert [s.job_id for s in sc.step_sockets(str(spool), "a.b")] == [1]
    finally:
        for s in held:
            s.close()


def test_step_sockets_empty_and_missing(tmp_path: Path) -> None:
    assert sc.step_sockets(str(tmp_path), "n1") == []
    with pytest.raises(FileNotFoundError):
        sc.step_sockets(str(tmp_path / "absent"), "n1")


def test_step_socket_properties() -> None:
    s = StepSocket("/x/n_1.4294967292", "n", 1, sc.EXTERN_STEP, None)
    assert s.is_extern and not s.is_batch
    assert sc.EXTERN_STEP == 4294967292 and sc.BATCH_STEP == 4294967291


# --- job_of_cgroup -----------------------------------------------------------------------

def cfg_for(plugin: str, **kw: object) -> SlurmNodeConfig:
    base = SlurmNodeConfig(nodename="node1", spool_dir="/s", prolog_contain=True,
                           proctrack="proctrack/cgroup", cgroup_plugin=plugin,
                           cgroup_prepend="/slurm", cgroup_mountpoint="/sys/fs/cgroup",
                           slurm_user="slurm", version=None)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


V1 = cfg_for("cgroup/v1")
V2 = cfg_for("cgroup/v2")


@pytest.mark.parametrize(("path", "job"), [
    ("/slurm/uid_1000/job_42/step_extern", 42),
    ("/slurm/uid_1000/job_42/step_extern/", 42),
    ("/slurm/uid_1000/job_42/step_0/task_3", 42),
    ("/slurm/uid_1000/job_42/step_batch", 42),
    ("/slurm/uid_1000/job_42", 42),
    ("/slurm/uid_0/job_4294967295/step_interactive", 4294967295),
    ("/slurm_node1/uid_1000/job_7/step_extern", 7),   # built for multiple slurmd
    ("/slurm/uid_1000", None),
    ("/slurm/uid_1000/job_42x/step_0", None),
    ("/slurm/uid_1000/job_4294967296/step_0", None),
    ("/slurm/uid_x/job_42/step_0", None),
    ("/slurm/uid_1000/job_42/other", None),
    ("/slurm_node2/uid_1000/job_7/step_extern", None),  # another slurmd's job
    ("/user.slice/user-1000.slice/session-3.scope", None),
    ("/lab/slurm/uid_1000/job_42/step_0", None),      # not at the namespace root
    ("/../slurm/uid_1000/job_42/step_0", None),
    ("/system.slice/slurmstepd.scope/job_42/step_0", None),   # a v2 path, v1 configured
    ("slurm/uid_1000/job_42/step_0", None),
    ("", None),
    ("/", None),
])
def test_job_of_cgroup_v1(path: str, job: int | None) -> None:
    assert sc.job_of_cgroup(path, V1) == job


def test_job_of_cgroup_v1_multiple_slurmd_prepend() -> None:
    cfg = cfg_for("cgroup/v1", cgroup_prepend="/slurm_node1", multiple_slurmd=True)
    assert sc.job_of_cgroup("/slurm_node1/uid_5/job_9/step_extern", cfg) == 9
    assert sc.job_of_cgroup("/slurm_node2/uid_5/job_9/step_extern", cfg) is None


@pytest.mark.parametrize(("path", "job"), [
    ("/system.slice/slurmstepd.scope/job_42/step_extern/user/task_special", 42),
    ("/system.slice/slurmstepd.scope/job_42/step_extern/slurm", 42),
    ("/system.slice/slurmstepd.scope/job_42/step_0/user/task_0", 42),
    ("/system.slice/slurmstepd.scope/job_42", 42),
    # slurmd in a container: the parent of pid 1's cgroup comes first (24.11+).
    ("/kubepods/pod1/system.slice/slurmstepd.scope/job_5/step_batch/user/task_0", 5),
    # multiple slurmd: the scope carries the node's name.
    ("/system.slice/node1_slurmstepd.scope/job_8/step_0/user/task_0", 8),
    ("/system.slice/node2_slurmstepd.scope/job_8/step_0/user/task_0", None),
    # SLUID directories (26.05+ without CgroupJobIdPaths): only the stepds can tell.
    ("/system.slice/slurmstepd.scope/sEKNKTV3WPV500/step_extern/user/task_special", None),
    ("/system.slice/slurmstepd.scope/system", None),     # slurmstepd's own cgroup
    ("/system.slice/slurmstepd.scope", None),
    ("/system.slice/slurmstepd.scope/job_42/bogus", None),
    ("/other.slice/slurmstepd.scope/job_42/step_0", None),   # not the configured slice
    ("/system.slice/slurmd.service", None),
    ("/slurm/uid_1000/job_42/step_extern", None),        # a v1 path, v2 configured
    ("/system.slice/../slurmstepd.scope/job_42", None),
])
def test_job_of_cgroup_v2(path: str, job: int | None) -> None:
    assert sc.job_of_cgroup(path, V2) == job


def test_job_of_cgroup_v2_cgroup_slice() -> None:
    cfg = cfg_for("cgroup/v2", cgroup_slice="slurm.slice")
    assert sc.job_of_cgroup("/slurm.slice/slurmstepd.scope/job_3/step_0/user/task_0",
                            cfg) == 3
    assert sc.job_of_cgroup("/system.slice/slurmstepd.scope/job_3/step_0", cfg) is None
    nested = cfg_for("cgroup/v2", cgroup_slice="hpc.slice/hpc-slurm.slice")
    assert sc.job_of_cgroup("/hpc.slice/hpc-slurm.slice/slurmstepd.scope/job_4/step_0",
                            nested) == 4
    assert sc.job_of_cgroup("/hpc-slurm.slice/slurmstepd.scope/job_4/step_0",
                            nested) is None


def test_job_of_cgroup_autodetect_and_disabled() -> None:
    auto = cfg_for("autodetect")
    assert sc.job_of_cgroup("/slurm/uid_1/job_2/step_0", auto) == 2
    assert sc.job_of_cgroup("/system.slice/slurmstepd.scope/job_3/step_0", auto) == 3
    assert sc.job_of_cgroup("/system.slice/slurmstepd.scope/sEKNKTV3WPV500", auto) is None
    off = cfg_for("disabled")
    assert sc.job_of_cgroup("/slurm/uid_1/job_2/step_0", off) is None
    assert sc.job_of_cgroup("/system.slice/slurmstepd.scope/job_3/step_0", off) is None


def test_sluid_pattern() -> None:
    assert sc.SLUID.fullmatch("sEKNKTV3WPV500")
    assert not sc.SLUID.fullmatch("sEKNKTV3WPV50")     # 13 characters in all: too short
    assert not sc.SLUID.fullmatch("sEKNKTV3WPV5I0")    # I is not Crockford base32


# --- versions and "newest" ---------------------------------------------------------------

@pytest.mark.parametrize(("text", "version"), [
    ("slurm 22.05.8\n", (22, 5)),
    ("slurm-wlm 22.05.8\n", (22, 5)),
    ("slurm 26.05.0-0rc1\n", (26, 5)),
    ("slurm 24.11\n", (24, 11)),
    ("", None),
    ("slurmd: error: something\n", None),
    ("version 22.05.8", None),
])
def test_parse_slurm_version(text: str, version: tuple[int, int] | None) -> None:
    assert sc.parse_slurm_version(text) == version


def test_probe_slurm_version(tmp_path: Path) -> None:
    fake = write(tmp_path / "slurmd", "#!/bin/sh\necho 'slurm 23.11.4'\n")
    fake.chmod(0o755)
    assert sc.probe_slurm_version([str(fake), "-V"]) == (23, 11)
    failing = write(tmp_path / "fails", "#!/bin/sh\necho 'slurm 23.11.4'; exit 1\n")
    failing.chmod(0o755)
    assert sc.probe_slurm_version([str(failing)]) is None
    assert sc.probe_slurm_version([str(tmp_path / "absent")]) is None


@pytest.mark.parametrize(("version", "plugin", "rule"), [
    ((22, 5), "cgroup/v1", "mtime"),
    ((22, 5), "cgroup/v2", "jobid"),
    ((25, 11), "cgroup/v1", "mtime"),
    ((25, 11), "cgroup/v2", "jobid"),
    ((26, 5), "cgroup/v1", "ctime"),
    ((26, 5), "cgroup/v2", "ctime"),
    ((26, 11), "disabled", "ctime"),
    (None, "cgroup/v1", "mtime"),
    (None, "cgroup/v2", "jobid"),
])
def test_newest_rule(version: tuple[int, int] | None, plugin: str, rule: str) -> None:
    assert sc.newest_rule(version, plugin) == rule


MOUNTS_V1 = """\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
28 26 0:26 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
29 26 0:27 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
"""
MOUNTS_V2 = "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n"
MOUNTS_HYBRID_V2 = """\
26 25 0:24 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/systemd rw - cgroup2 cgroup2 rw
"""


@pytest.mark.parametrize(("mounts", "plugin"), [
    (MOUNTS_V1, "cgroup/v1"), (MOUNTS_V2, "cgroup/v2"), (MOUNTS_HYBRID_V2, "cgroup/v2"),
    ("25 30 0:23 / /sys rw - sysfs sysfs rw\n", None),
])
def test_detect_cgroup_plugin(tmp_path: Path, mounts: str, plugin: str | None) -> None:
    mi = write(tmp_path / "mountinfo", mounts)
    assert sc.detect_cgroup_plugin(str(mi)) == plugin


def test_newest_rule_autodetect(tmp_path: Path) -> None:
    assert sc.newest_rule((22, 5), "autodetect",
                          mountinfo=str(write(tmp_path / "a", MOUNTS_V1))) == "mtime"
    assert sc.newest_rule((22, 5), "autodetect",
                          mountinfo=str(write(tmp_path / "b", MOUNTS_V2))) == "jobid"
    with pytest.raises(ValueError, match="no newest rule"):
        sc.newest_rule((22, 5), "autodetect", mountinfo=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="no newest rule"):
        sc.newest_rule((22, 5), "disabled")
