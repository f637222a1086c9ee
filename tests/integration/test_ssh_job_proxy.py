"""`ssh job.42` in the lab: plain OpenSSH clients with the block `ssh-to-job -ssh-config`
prints (real sshd -i, munged, cgroups, the lab's agents; native backend).

The lab users' homes are the machine's own (/home/alice), shared with every other lab
and test run, so the block goes into a file of the test's (`ssh -F FILE`, as a user's
~/.ssh/config would hold it) and the keys into a directory of the test's (`-ssh-dir`).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import Tmux, adoptctl

pytestmark = pytest.mark.root

JOB = "prx1"
WEB = "prx-web"
WEB_PORT = 8765     # inside the job's node (node1): loopback only
LOCAL_PORT = 18765  # on the client's node (node2)


@pytest.fixture(scope="module")
def work(lab: Any, shared_dir: Path) -> Iterator[Path]:
    work = shared_dir / "prx-work"
    work.mkdir()
    work.chmod(0o777)
    (work / "marker.txt").write_text("served from inside the job\n")
    (work / "marker.txt").chmod(0o644)
    adoptctl(lab, "node1", "job", "run", "--id", JOB, "--user", "alice", "--cwd", str(work),
             "--", "/bin/sleep", "1000000")
    # A job whose main process listens on node1's loopback (ssh -L reaches it).
    adoptctl(lab, "node1", "job", "run", "--id", WEB, "--user", "alice", "--cwd", str(work),
             "--", "/usr/bin/python3", "-m", "http.server", "--bind", "127.0.0.1",
             str(WEB_PORT))
    yield work
    adoptctl(lab, "node1", "job", "end", JOB, check=False)
    adoptctl(lab, "node1", "job", "end", WEB, check=False)


def ssh_config(lab: Any, shared_dir: Path, user: str, name: str = "") -> tuple[Path, Path]:
    """(config file, key directory) for `user`: the printed block, as the user gets it."""
    keys = shared_dir / f"prx-keys-{user}{name}"
    r = lab.run("node1", [lab.venv_bin("ssh-to-job"), "-ssh-config", "-ssh-dir", str(keys)],
                user=user)
    config = shared_dir / f"prx-config-{user}{name}"
    config.write_text(r.stdout)
    config.chmod(0o644)
    return config, keys


@pytest.fixture(scope="module")
def alice(lab: Any, shared_dir: Path) -> tuple[Path, Path]:
    return ssh_config(lab, shared_dir, "alice")


def sh(lab: Any, node: str, script: str, user: str = "alice", timeout: float = 90,
       ) -> subprocess.CompletedProcess[str]:
    r: subprocess.CompletedProcess[str] = lab.run(node, ["sh", "-c", script], user=user,
                                                  check=False, timeout=timeout)
    return r


def sessions_left(lab: Any) -> list[str]:
    out: str = lab.run("node1", ["sh", "-c", "ls /run/callerid-adopt/sessions 2>/dev/null || "
                                             "true"]).stdout
    return out.split()


def wait_no_sessions(lab: Any) -> None:
    deadline = time.monotonic() + 10
    while sessions_left(lab) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sessions_left(lab) == []


def wait_entries_gone(keys: Path) -> None:
    """Each proxy removes its known_hosts entry when it ends: after ssh's SIGHUP it gives
    the agent up to END_GRACE to end the session, then up to 5 s more for its relay
    thread, on a machine the whole suite loads. An entry still there names the proxy
    (its pid): whether it still runs tells a slow clean-up from a lost one."""
    deadline = time.monotonic() + 30
    while (text := (keys / "known_hosts").read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(line.rsplit(":", 2)[1]) for line in text.splitlines() if ":" in line]
    assert text == "", (text, {p: Path(f"/proc/{p}").exists() for p in pids})


def test_the_block(alice: tuple[Path, Path], lab: Any) -> None:
    config, keys = alice
    text = config.read_text()
    assert "Host job.*" in text and "StrictHostKeyChecking yes" in text
    assert f"{lab.venv_bin('ssh-to-job')} -ssh-dir {keys} -proxy %n -port %p" in text
    assert keys.stat().st_mode & 0o777 == 0o700
    assert (keys / "id_ed25519").stat().st_mode & 0o777 == 0o600


def test_ssh_true_and_a_command(lab: Any, work: Path, alice: tuple[Path, Path]) -> None:
    config, keys = alice
    r = sh(lab, "node1", f"ssh -F {config} job.{JOB} true")
    assert r.returncode == 0, r.stderr
    r = sh(lab, "node1", f"ssh -F {config} job.{JOB} "
           "'hostname; pwd; echo $CALLERID_JOB_ID; grep ^0:: /proc/self/cgroup; exit 3'")
    assert r.returncode == 3, r.stderr
    host, cwd, job, cgroup = r.stdout.splitlines()
    assert (host, cwd, job) == ("node1", str(work), JOB)
    assert cgroup.startswith(f"0::/callerid/job_{JOB}/ssh-to-job/")
    # From another node: found by the fan-out over the lab's `nodes`, or named.
    for host in (f"job.{JOB}", f"job.{JOB}--node1"):
        r = sh(lab, "node2", f"ssh -F {config} {host} hostname")
        assert (r.returncode, r.stdout.strip()) == (0, "node1"), (host, r.stderr)
    # Each proxy took its host key entry away again.
    assert (keys / "known_hosts").read_text() == ""
    wait_no_sessions(lab)


def test_a_job_id_in_mixed_case(lab: Any, work: Path, alice: tuple[Path, Path]) -> None:
    """ssh lower-cases the host name (%h); the block passes it as typed (%n), so job
    Prx2 is reached, not a job prx2, which does not exist."""
    config, _ = alice
    adoptctl(lab, "node1", "job", "run", "--id", "Prx2", "--user", "alice", "--",
             "/bin/sleep", "1000000")
    try:
        r = sh(lab, "node2", f"ssh -F {config} job.Prx2 'echo $CALLERID_JOB_ID'")
        assert (r.returncode, r.stdout.strip()) == (0, "Prx2"), r.stderr
    finally:
        adoptctl(lab, "node1", "job", "end", "Prx2", check=False)
    wait_no_sessions(lab)


def test_host_key_checking_is_strict(lab: Any, work: Path, alice: tuple[Path, Path],
                                     shared_dir: Path) -> None:
    """The block's checking is on: with known_hosts elsewhere (the proxy's entry unseen),
    ssh refuses the session's key instead of asking or accepting it."""
    config, keys = alice
    other = shared_dir / "prx-config-elsewhere"
    other.write_text(config.read_text().replace(f"UserKnownHostsFile {keys}/known_hosts",
                                                "UserKnownHostsFile /dev/null"))
    other.chmod(0o644)
    assert other.read_text() != config.read_text()
    r = sh(lab, "node1", f"ssh -F {other} job.{JOB} echo reached")
    assert r.returncode == 255 and "reached" not in r.stdout
    assert "Host key verification failed" in r.stderr, r.stderr
    wait_no_sessions(lab)


def test_interactive_shell_in_a_terminal(lab: Any, work: Path, alice: tuple[Path, Path],
                                         shared_dir: Path) -> None:
    config, keys = alice
    t = Tmux(lab, "node1", "alice", shared_dir / "prx-tmux")
    try:
        t.start(["sh", "-c", '"$@"; echo "STATUS=$?"', "sh", "ssh", "-F", str(config),
                 f"job.{JOB}"])
        t.wait(lambda: "$" in t.screen() or "#" in t.screen(), why="a prompt")
        t.keys('echo "T$((1+1))=$(tty) J$((1+1))=$CALLERID_JOB_ID"', "Enter")
        screen = t.wait(lambda: (lambda s: s if "T2=" in s else "")(t.screen()),
                        why="the answer")
        assert "T2=/dev/pts/" in screen and f"J2={JOB}" in screen, screen
        t.keys("exit 4", "Enter")
        t.wait(lambda: "STATUS=" in t.screen(), why="ssh to end")
        assert "STATUS=4" in t.screen(), t.screen()
    finally:
        t.kill()
    wait_no_sessions(lab)
    wait_entries_gone(keys)


def test_ssh_killed_ends_the_session_and_the_proxy(lab: Any, work: Path,
                                                   alice: tuple[Path, Path]) -> None:
    """kill -9 of ssh: the proxy sees its stdin end, the session ends (sshd gets the
    EOF), the proxy exits and takes its known_hosts entry with it."""
    config, keys = alice
    ssh = lab.popen("node1", ["ssh", "-F", str(config), f"job.{JOB}", "echo up; sleep 1000"],
                    user="alice", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert ssh.stdout is not None and ssh.stdout.readline().strip() == "up"
        assert f"job.{JOB} " in (keys / "known_hosts").read_text()
        assert sshds_in_node1(lab, "alice")  # (what the bob test counts, seen here)
        proxies = lab.run("node1", ["pgrep", "-u", "alice", "-f", "--", f"-proxy job.{JOB} -port"],
                          check=False).stdout.split()
        assert len(proxies) == 1, proxies
        ssh.kill()
        ssh.wait()
    finally:
        if ssh.poll() is None:
            ssh.kill()
            ssh.wait()
    wait_no_sessions(lab)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proxies[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{proxies[0]}").exists()
    wait_entries_gone(keys)


def test_an_idle_session_lives(lab: Any, work: Path, alice: tuple[Path, Path]) -> None:
    """A session quiet for 20 s over TCP (an editor's idle connection): the client's
    keepalive pings every 5 s are accepted (they drew a GOAWAY "too many pings" after
    ~15 s while the agent set an option name gRPC does not know)."""
    config, _ = alice
    r = sh(lab, "node2", f"ssh -F {config} job.{JOB}--node1 'sleep 20; echo done'")
    assert (r.returncode, r.stdout) == (0, "done\n"), r.stderr
    wait_no_sessions(lab)


def test_scp_sftp_rsync(lab: Any, work: Path, alice: tuple[Path, Path],
                        shared_dir: Path) -> None:
    config, _ = alice
    src = shared_dir / "prx-src.bin"
    src.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    src.chmod(0o644)
    out = shared_dir / "prx-out"
    out.mkdir()
    out.chmod(0o777)
    batch = shared_dir / "prx-sftp-batch"
    batch.write_text(f"get up.bin {out}/sftp.bin\nput {src} sftp-up.bin\n")
    batch.chmod(0o644)
    e = shlex.quote(f"ssh -F {config}")
    for script in (f"scp -F {config} {src} job.{JOB}:up.bin",
                   f"scp -F {config} job.{JOB}:up.bin {out}/scp.bin",
                   f"sftp -F {config} -b {batch} job.{JOB}",
                   f"rsync -e {e} job.{JOB}:up.bin {out}/rsync.bin",
                   f"rsync -e {e} {src} job.{JOB}:rsync-up.bin"):
        r = sh(lab, "node2" if "rsync" in script else "node1",
               script.replace(f"job.{JOB}", f"job.{JOB}--node1") if "rsync" in script
               else script)
        assert r.returncode == 0, (script, r.stderr)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    for f in (out / "scp.bin", out / "sftp.bin", out / "rsync.bin", work / "up.bin",
              work / "sftp-up.bin", work / "rsync-up.bin"):
        assert hashlib.sha256(f.read_bytes()).hexdigest() == digest, f
    wait_no_sessions(lab)


def test_local_forward_reaches_a_port_inside_the_job(lab: Any, work: Path,
                                                     alice: tuple[Path, Path]) -> None:
    """ssh -L on node2 reaches 127.0.0.1:WEB_PORT of node1, where the job listens:
    node2 itself cannot (its loopback is its own), so the bytes went through the job."""
    config, _ = alice
    fetch = ("python3 -c 'import urllib.request as u; print(u.urlopen("
             "\"http://127.0.0.1:%d/marker.txt\", timeout=5).read().decode(), end=\"\")'")
    direct = sh(lab, "node2", fetch % WEB_PORT)
    assert direct.returncode != 0 and "Connection refused" in direct.stderr
    fwd = lab.popen("node2", ["ssh", "-F", str(config), "-N", "-o", "ExitOnForwardFailure=yes",
                              "-L", f"127.0.0.1:{LOCAL_PORT}:127.0.0.1:{WEB_PORT}",
                              f"job.{WEB}--node1"], user="alice", stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            r = sh(lab, "node2", fetch % LOCAL_PORT)
            if r.returncode == 0 or time.monotonic() > deadline or fwd.poll() is not None:
                break
            time.sleep(0.3)
        assert r.returncode == 0, (r.stderr, fwd.poll())
        assert r.stdout == "served from inside the job\n"
    finally:
        fwd.terminate()
        fwd.communicate(timeout=30)
    wait_no_sessions(lab)


def test_vscode_style_session_with_dynamic_forward(lab: Any, work: Path,
                                                  alice: tuple[Path, Path]) -> None:
    """What VS Code Remote-SSH runs (`ssh -T -D PORT HOST bash`, its script on stdin, then
    connections through the SOCKS port to a port inside the remote)."""
    config, _ = alice
    fwd = lab.popen("node2", ["ssh", "-F", str(config), "-T", "-D", f"127.0.0.1:{LOCAL_PORT}",
                              f"job.{WEB}--node1", "bash"], user="alice",
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
    try:
        assert fwd.stdin is not None and fwd.stdout is not None
        fwd.stdin.write('echo "ready $CALLERID_JOB_ID $(hostname)"\n')
        fwd.stdin.flush()
        assert fwd.stdout.readline().strip() == f"ready {WEB} node1"
        r = sh(lab, "node2", f"curl -sS --max-time 10 --socks5 127.0.0.1:{LOCAL_PORT} "
               f"http://127.0.0.1:{WEB_PORT}/marker.txt")
        assert (r.returncode, r.stdout) == (0, "served from inside the job\n"), r.stderr
        fwd.stdin.close()  # bash ends, and the session with it
        assert fwd.wait(timeout=30) == 0
    finally:
        if fwd.poll() is None:
            fwd.kill()
            fwd.wait()
    wait_no_sessions(lab)


@pytest.mark.skipif(shutil.which("ansible") is None,
                    reason="no ansible (deploy/install-deps.sh installs ansible-core)")
def test_ansible(lab: Any, work: Path, alice: tuple[Path, Path], shared_dir: Path) -> None:
    """Ansible's ping, copy (its file transfer) and shell modules in the job, through the
    same ssh configuration. Its own files go to a directory of the test's, not to the
    shared /home/alice; no ControlPersist master is left behind."""
    config, keys = alice
    home = shared_dir / "prx-ansible"
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    (home / "f.txt").write_text("copied by ansible\n")
    (home / "f.txt").chmod(0o644)
    env = {"ANSIBLE_HOME": str(home / "home"), "ANSIBLE_LOCAL_TEMP": str(home / "local"),
           "ANSIBLE_REMOTE_TEMP": str(home / "remote"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_SSH_ARGS": f"-F {config} -o ControlMaster=no",
           "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3"}
    for module, arg in (("ping", ""), ("copy", f"src={home}/f.txt dest={work}/ansible.txt"),
                        ("shell", "echo $CALLERID_JOB_ID $(hostname)")):
        r = lab.run("node1", ["ansible", "all", "-i", f"job.{JOB},", "-m", module,
                              *(["-a", arg] if arg else [])], user="alice", env=env,
                    check=False, timeout=120)
        assert r.returncode == 0, (module, r.stdout, r.stderr)
    assert f"{JOB} node1" in r.stdout, r.stdout
    assert (work / "ansible.txt").read_text() == "copied by ansible\n"
    wait_no_sessions(lab)
    wait_entries_gone(keys)


def test_remote_forward_is_refused_and_w_works(lab: Any, work: Path,
                                               alice: tuple[Path, Path]) -> None:
    """Nothing may listen for the client: -R fails (and so does the command with it).
    `ssh -W` (how ProxyJump reaches a host beyond) to a TCP port in the job works."""
    config, _ = alice
    r = sh(lab, "node1", f"ssh -F {config} -o ExitOnForwardFailure=yes "
           f"-R 127.0.0.1:18766:127.0.0.1:22 job.{JOB} true")
    assert r.returncode == 255 and "remote port forwarding failed" in r.stderr, r.stderr
    r = sh(lab, "node2", f"printf 'GET /marker.txt HTTP/1.0\\r\\n\\r\\n' | "
           f"ssh -F {config} -W 127.0.0.1:{WEB_PORT} job.{WEB}--node1")
    assert r.returncode == 0 and "served from inside the job" in r.stdout, r.stderr
    wait_no_sessions(lab)


def test_two_at_once_and_a_key_made_on_first_use(lab: Any, work: Path, shared_dir: Path,
                                                 ) -> None:
    """A key directory that does not exist yet: the proxies make it and the key; two
    sessions at once each keep their own host key entry."""
    config, keys = ssh_config(lab, shared_dir, "alice", "-fresh")
    lab.run("node1", ["rm", "-rf", str(keys)])
    r = sh(lab, "node1", f"ssh -F {config} job.{JOB} 'sleep 2; echo one' & "
           f"ssh -F {config} job.{JOB} 'sleep 2; echo two'; wait $!")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == ["one", "two"], r.stderr
    assert (keys / "known_hosts").read_text() == ""
    assert sorted(p.name for p in keys.iterdir()) == ["id_ed25519", "id_ed25519.pub",
                                                      "known_hosts", "lock"]
    wait_no_sessions(lab)


def sshds_in_node1(lab: Any, user: str) -> set[int]:
    """`user`'s sshd processes in node1's network namespace (all labs share one pid
    namespace: other labs' sessions are not counted)."""
    netns = lab.run("node1", ["readlink", "/proc/self/ns/net"]).stdout.strip()
    uid, found = pwd.getpwnam(user).pw_uid, set()
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and entry.stat().st_uid == uid
                    and (entry / "comm").read_text().strip() == "sshd"
                    and os.readlink(entry / "ns" / "net") == netns):
                found.add(int(entry.name))
        except OSError:  # Race: it exited meanwhile
            continue
    return found


def test_bob_is_refused_before_any_sshd_starts(lab: Any, work: Path,
                                               shared_dir: Path) -> None:
    """bob's proxy finds no job of his (ListJobs answers as for a missing one), so it never
    asks for a session; asked directly, OpenJobShell refuses him before starting anything
    (shared_dir/open_job_shell.py, as in test_ssh_to_job_attacks.py)."""
    config, keys = ssh_config(lab, shared_dir, "bob")
    mark = len(lab.agent_log("node1"))
    before = sshds_in_node1(lab, "bob")
    for node, host in (("node1", f"job.{JOB}"), ("node2", f"job.{JOB}--node1")):
        r = sh(lab, node, f"ssh -F {config} {host} true", user="bob")
        ours = [line for line in r.stderr.splitlines() if line.startswith("ssh-to-job: ")]
        assert r.returncode == 255 and len(ours) == 1, r.stderr
        assert ours[0].startswith(f"ssh-to-job: Not found: no job {JOB} on ") and \
            ours[0].endswith(" (or not yours)"), ours
    probe = [lab.venv_bin("python"), str(shared_dir / "open_job_shell.py"), "node1", JOB]
    assert lab.run("node1", probe, user="bob").stdout.strip() == \
        f"NOT_FOUND: no job {JOB} on node1"
    after = sshds_in_node1(lab, "bob")
    assert before == after
    assert sessions_left(lab) == []
    log = lab.agent_log("node1")[mark:]
    bob = pwd.getpwnam("bob").pw_uid
    assert f"SECURITY: uid {bob} asked node1 for a shell in job {JOB}" in log, log
    assert "opened session" not in log
    assert not (keys / "known_hosts").exists()


def test_from_a_machine_without_ssh_to_job_through_the_login_node(
        lab: Any, work: Path, shared_dir: Path) -> None:
    """`-ssh-config -via login`: node2 plays a laptop that has ssh and its own key only;
    node1 is the login node ("login", an alias for its plain sshd on port 2201, as a
    user's ~/.ssh/config would name it). ssh on the laptop runs the proxy on the login
    node through ssh and reads the session's host key with KnownHostsCommand from the
    login node's known_hosts; the login node has the laptop's public key only."""
    laptop, login = shared_dir / "prx-laptop", shared_dir / "prx-login"
    for d in (laptop, login):
        sh(lab, "node2", f"umask 077 && mkdir {d}")
    sh(lab, "node2", f"ssh-keygen -q -t ed25519 -N '' -f {laptop}/id_ed25519")
    sh(lab, "node1", f"umask 077 && cat > {login}/id_ed25519.pub < {laptop}/id_ed25519.pub")
    alias = lab.dir / "ssh" / "ssh_config.d" / "prx-login.conf"
    alias.write_text(f"Host login\n    HostName node1\n    Port {lab.sshd_port('none')}\n")
    alias.chmod(0o644)
    try:
        r = lab.run("node1", [lab.venv_bin("ssh-to-job"), "-ssh-config", "-via", "login",
                              "-ssh-dir", str(login)], user="alice")
        block = r.stdout
        assert "    ProxyCommand ssh login '" in block
        assert "    KnownHostsCommand /usr/bin/ssh login '" in block
        assert not (login / "id_ed25519").exists()   # the login node keeps no private key
        config = shared_dir / "prx-config-laptop"
        config.write_text(block.replace("IdentityFile ~/.ssh/ssh-to-job/id_ed25519",
                                        f"IdentityFile {laptop}/id_ed25519"))
        config.chmod(0o644)
        r = sh(lab, "node2", f"ssh -F {config} job.{JOB} 'echo $CALLERID_JOB_ID; hostname'")
        assert r.returncode == 0 and r.stdout.split() == [JOB, "node1"], r.stderr
        # scp the same way
        r = sh(lab, "node2", f"scp -F {config} job.{JOB}:marker.txt {laptop}/m.txt && "
               f"cat {laptop}/m.txt")
        assert r.returncode == 0 and r.stdout == "served from inside the job\n", r.stderr
        # Strict: with no host key from the login node, ssh refuses the session's.
        blind = shared_dir / "prx-config-laptop-blind"
        blind.write_text(config.read_text().replace(f"cat {login}/known_hosts",
                                                    "cat /dev/null"))
        blind.chmod(0o644)
        r = sh(lab, "node2", f"ssh -F {blind} job.{JOB} true")
        assert r.returncode == 255 and "Host key verification failed" in r.stderr, r.stderr
    finally:
        alias.unlink()
    wait_no_sessions(lab)
    wait_entries_gone(login)
