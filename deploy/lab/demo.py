"""The demo: a 3-node lab, jobs, caller ID and ssh adoption across nodes, as a user sees it.

    python3 deploy/lab/demo.py [--venv .venv] [--name NAME] [--keep]

Brings the lab up (deploy/lab/lab.py), runs a job of alice on node1 that connects to
node2 and node3, asks node2 "which job owns this connection?" with `adoptctl whois`
(node1's agent answers), shows what bob is told about the same connection; then real ssh
logins: bob, who has no job on node2, is refused; alice's jobs ssh to node2 and each
session lands in the job it came from; ending a job on node2 ends its ssh sessions.
Then ssh-to-job: a command inside a running job (its directory, environment, pids and
cgroup), from another node too without naming the job's node, scp and rsync of its
files, and bob refused. Finally
the jobs end and nothing of them is left. Tears the lab down at the end (unless --keep),
also after a failure. Every command is printed as it would be typed on the node.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import lab as lab_mod

HERE = Path(__file__).resolve().parent


def banner(text: str) -> None:
    print(f"\n=== {text}")


def show(lab: lab_mod.Lab, node: str, argv: list[str], user: str | None = None,
         check: bool = True) -> str:
    shown = [Path(a).name if a.startswith(str(lab.venv_bin(""))) else a for a in argv]
    who = user or "root"
    print(f"{who}@{node}$ {shlex.join(shown)}")
    r = lab.run(node, argv, user=user, check=check)
    text = (r.stdout + r.stderr).rstrip()
    if text:
        print("    " + text.replace("\n", "\n    "))
    return r.stdout


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {path} did not appear")
        time.sleep(0.05)


def in_job(lab: lab_mod.Lab, node: str, job: str, user: str, argv: list[str],
           shown: str) -> None:
    """Run argv as user on node inside job (as a process the job started would)."""
    print(f"{user}@{node} (a process of job {job})$ {shown}")
    p = lab.popen(node, ["/bin/sh", "-c", 'read go; exec "$@"', "sh", *argv], user=user,
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                  text=True)
    lab.run(node, [lab.venv_bin("adoptctl"), "job", "attach", job, str(p.pid)])
    out, _ = p.communicate("go\n", timeout=60)
    if out.strip():
        print("    " + out.rstrip().replace("\n", "\n    "))


def adoption(lab: lab_mod.Lab) -> None:
    adoptctl = lab.venv_bin("adoptctl")
    banner("ssh into a node where you have no job: refused (pam_adopt in sshd's account stack)")
    print("bob@node1$ ssh node2 hostname")
    r = lab.run("node1", lab.ssh_argv("node2", ["hostname"], family=0), user="bob",
                check=False)
    print("    " + (r.stdout + r.stderr).strip().replace("\n", "\n    "))
    print(f"    (exit status {r.returncode})")

    banner("alice's job 42 runs on node2 too, and so does her job 43")
    show(lab, "node2", [adoptctl, "job", "run", "--id", "42", "--user", "alice", "--",
                        "/bin/sleep", "1000000"])
    show(lab, "node2", [adoptctl, "job", "run", "--id", "43", "--user", "alice", "--",
                        "/bin/sleep", "1000000"])
    banner("job 42 on node1 runs `ssh node2 ...`: the session lands in job 42 on node2")
    remote = ("hostname; cat /proc/self/cgroup | grep -E 'freezer|^0::'; "
              "echo CALLERID_JOB_ID=$CALLERID_JOB_ID")
    in_job(lab, "node1", "42", "alice", lab.ssh_argv("node2", remote, family=0),
           f"ssh node2 '{remote}'")
    print("    (node2's agent asked node1's which job owns the connection; its log:)")
    for line in lab.agent_log("node2").splitlines():
        if "admission:" in line:
            print("    " + line.split(" node_agent.agent.admission: ", 1)[-1])
    banner("the same from job 43 lands in job 43; ending job 43 on node2 ends its sessions")
    p = lab.popen("node1", ["/bin/sh", "-c", 'read go; exec "$@"', "sh",
                            *lab.ssh_argv("node2", "echo connected; exec sleep 1000000",
                                          family=0)],
                  user="alice", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                  stderr=subprocess.DEVNULL, text=True)
    lab.run("node1", [adoptctl, "job", "attach", "43", str(p.pid)])
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("go\n")
    p.stdin.flush()
    print("alice@node1 (a process of job 43)$ ssh node2 'echo connected; exec sleep 1000000' &")
    print("    " + p.stdout.readline().strip())
    show(lab, "node2", [adoptctl, "job", "show", "43"])
    show(lab, "node2", [adoptctl, "job", "end", "43"])
    rc = p.wait(timeout=30)
    print(f"    (the ssh session on node1 ended with status {rc})")
    show(lab, "node2", [adoptctl, "job", "end", "42"])


def ssh_to_job(lab: lab_mod.Lab, work: Path) -> None:
    adoptctl, stj = lab.venv_bin("adoptctl"), lab.venv_bin("ssh-to-job")
    banner("ssh-to-job: into a running job, without any sshd listening on the network")
    job_dir = work / "job44"
    job_dir.mkdir(mode=0o777)
    job_dir.chmod(0o777)
    show(lab, "node1", [adoptctl, "job", "run", "--id", "44", "--user", "alice", "--cwd",
                        str(job_dir), "--env", "OMP_NUM_THREADS=4", "--", "/bin/sh", "-c",
                        "echo 'step 1: converged' > result.txt; exec sleep 1000000"])
    time.sleep(0.3)
    show(lab, "node1", [stj, "44", "hostname; pwd; echo OMP_NUM_THREADS=$OMP_NUM_THREADS "
                        "CALLERID_JOB_PIDS=$CALLERID_JOB_PIDS; grep ^0:: /proc/self/cgroup"],
         user="alice")
    banner("from another node, without naming node1 (the job's homes among `nodes` say "
           "where it runs), with the remote command's exit status")
    show(lab, "node2", ["sh", "-c", f"{stj} 44 'hostname; exit 7'; echo exit status $?"],
         user="alice")
    show(lab, "node3", [adoptctl, "jobs", "--all"], user="alice")
    banner("copy the job's files out: scp with any host name, rsync with the job id as host")
    out = work / "alice-out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    show(lab, "node1", [stj, "-ssh", "scp", "44", "remote:result.txt", str(out / "scp.txt")],
         user="alice")
    show(lab, "node1", ["rsync", "-e", stj, "44:result.txt", str(out / "rsync.txt")],
         user="alice")
    show(lab, "node1", ["cat", str(out / "scp.txt"), str(out / "rsync.txt")], user="alice")
    banner("bob does not own job 44: refused, nothing started on the node")
    show(lab, "node1", [stj, "44", "true"], user="bob", check=False)
    show(lab, "node1", ["ls", "-A", "/run/callerid-adopt/sessions"])
    show(lab, "node1", [adoptctl, "job", "end", "44"])


def demo(lab: lab_mod.Lab, work: Path) -> None:
    adoptctl = lab.venv_bin("adoptctl")
    for prog in (HERE / "progs").glob("*.py"):
        shutil.copy(prog, work / prog.name)
    n2, n3 = lab.ip("node2"), lab.ip("node3", 6)

    banner("node2 and node3 run a service (not part of any job)")
    accepted = work / "accepted"
    listener2 = lab.popen("node2", ["/usr/bin/python3", str(work / "listener.py"),
                                    str(accepted) + "-2", f"{n2}:5000"])
    listener3 = lab.popen("node3", ["/usr/bin/python3", str(work / "listener.py"),
                                    str(accepted) + "-3", f"[{n3}]:5000"])
    wait_for(Path(f"{accepted}-2.ready"))
    wait_for(Path(f"{accepted}-3.ready"))
    try:
        banner("the scheduler starts job 42 of alice on node1 (native registry)")
        conns = work / "conns-42"
        show(lab, "node1", [adoptctl, "job", "run", "--id", "42", "--user", "alice",
                            "--output", str(work / "job42.log"), "--", "/usr/bin/python3",
                            str(work / "holder.py"), str(conns), f"{n2}:5000", f"[{n3}]:5000"])
        show(lab, "node1", [adoptctl, "job", "start", "--id", "43", "--user", "alice"])
        wait_for(conns)
        time.sleep(0.3)
        show(lab, "node1", [adoptctl, "jobs"])
        show(lab, "node1", [adoptctl, "job", "show", "42"])

        banner("node2 sees a connection from node1; which job sent it? (node1's agent answers)")
        line = Path(f"{accepted}-2").read_text().splitlines()[0]
        src_ip, src_port, dst_ip, dst_port = line.split()
        v4_src, v4_dst = f"{src_ip}:{src_port}", f"{dst_ip}:{dst_port}"
        show(lab, "node2", ["cat", "/etc/hosts"])
        show(lab, "node2", [adoptctl, "whois", v4_src, v4_dst])
        banner("the same over IPv6, seen from node3")
        line = Path(f"{accepted}-3").read_text().splitlines()[0]
        src_ip, src_port, dst_ip, dst_port = line.split()
        show(lab, "node3", [adoptctl, "whois", f"[{src_ip}]:{src_port}",
                            f"[{dst_ip}]:{dst_port}"])
        banner("alice may ask about her own connection; bob is told nothing")
        show(lab, "node3", [adoptctl, "whois", f"[{src_ip}]:{src_port}",
                            f"[{dst_ip}]:{dst_port}"], user="alice")
        show(lab, "node3", [adoptctl, "whois", f"[{src_ip}]:{src_port}",
                            f"[{dst_ip}]:{dst_port}"], user="bob", check=False)
        print("    (node1's agent logged:)")
        for log_line in lab.agent_log("node1").splitlines():
            if "SECURITY" in log_line:
                print("    " + log_line)

        banner("the agent restarts (kill -9): no job is lost")
        lab.agent_stop("node1", sig=9)
        lab.agent_start("node1")
        show(lab, "node1", [adoptctl, "jobs"])

        adoption(lab)
        ssh_to_job(lab, work)

        banner("the job ends: every process in it is killed, its cgroups removed")
        show(lab, "node1", [adoptctl, "job", "end", "42"])
        show(lab, "node1", [adoptctl, "job", "end", "43"])
        show(lab, "node1", [adoptctl, "jobs"])
        show(lab, "node2", [adoptctl, "whois", v4_src, v4_dst, "--node", "node1"], check=False)
    finally:
        for p in (listener2, listener3):
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default=str(HERE.parents[1] / ".venv"))
    parser.add_argument("--name", default=lab_mod.DEFAULT_NAME,
                        help="lab instance name (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    args = parser.parse_args()
    lab = lab_mod.Lab(nodes=3, venv=args.venv, name=args.name)
    work = Path(tempfile.mkdtemp(prefix="callerid-demo-"))
    work.chmod(0o1777)
    ok = False
    try:
        banner("bringing up the lab: 3 nodes (namespaces), munged, one node agent per node")
        lab.up()
        show(lab, "node1", ["hostname"])
        demo(lab, work)
        ok = True
    finally:
        if not args.keep or not ok:
            banner("tearing the lab down")
            lab.down()
        shutil.rmtree(work, ignore_errors=True)
    print("\ndemo: done")


if __name__ == "__main__":
    main()
