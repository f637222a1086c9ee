"""Slurm's facts on a node, read the way slurmd reads them: stdlib only, no Slurm library.

  read_node_config   slurm.conf (+ Include files) and cgroup.conf next to it -> SlurmNodeConfig
  step_sockets       the slurmstepd sockets of this node in the spool dir -> [StepSocket]
  job_of_cgroup      a cgroup path from /proc/<pid>/cgroup -> the Slurm job id, when unambiguous
  newest_rule        what pam_slurm_adopt of a version calls the "newest" job
  parse_slurm_version, probe_slurm_version, detect_cgroup_plugin   small helpers for those

Every fact below was read from Slurm's source (SchedMD/slurm, tags slurm-22-05-8-1 to
slurm-26-05-3-1 and master, 26.11 to be); each docstring names the versions it holds for.
This module writes nothing and asks no daemon: the Slurm backend (node_agent.jobs.slurm)
builds on it, and asks the stepds (node_agent.jobs.stepd) whatever a path cannot tell.

Errors: a missing or unparsable configuration raises ValueError naming the file and line;
the spool dir's listing raises the OSError it gets (a missing spool dir is a configuration
fact the caller should report, not an empty node).
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

#: Special step ids (slurm.h, identical 22.05 to master): the extern step that
#: PrologFlags=Contain creates (and pam_slurm_adopt adopts into), the batch script's step,
#: the allocation's interactive step (20.11+), and a step still pending.
EXTERN_STEP = 0xFFFFFFFC
BATCH_STEP = 0xFFFFFFFB
INTERACTIVE_STEP = 0xFFFFFFFA
PENDING_STEP = 0xFFFFFFFD

#: Defaults of slurm.conf / cgroup.conf (src/common/read_config.[ch], src/common/cgroup.c in
#: 22.05, src/interfaces/cgroup.c from 23.02): SlurmdSpoolDir, SlurmUser, ProctrackType
#: (Slurm built with cgroup support, as Debian's is), CgroupMountpoint, CgroupPlugin,
#: CgroupSlice (cgroup/v2 only, a key from 25.11).
DEFAULT_SPOOL_DIR = "/var/spool/slurmd"
DEFAULT_SLURM_USER = "root"
DEFAULT_PROCTRACK = "proctrack/cgroup"
DEFAULT_CGROUP_MOUNTPOINT = "/sys/fs/cgroup"
DEFAULT_CGROUP_PLUGIN = "autodetect"
DEFAULT_CGROUP_SLICE = "system.slice"
CGROUP_PLUGINS = ("cgroup/v1", "cgroup/v2", "autodetect", "disabled")

#: How deep Include lines may nest before we call it a loop (Slurm has no limit; a file
#: that includes itself makes slurmd recurse until it fails).
_MAX_INCLUDE_DEPTH = 16

#: Lines whose first key starts a record, the rest of the line being that record's keys
#: (S_P_ARRAY / S_P_LINE in read_config.c); every other line sets top-level keys.
_RECORD_KEYS = frozenset({"nodename", "partitionname", "nodeset", "downnodes",
                          "frontendname"})


@dataclass(frozen=True)
class StepSocket:
    """One slurmstepd socket in the spool dir: ``<NodeName>_<jobid>.<stepid>[.<het>]``.

    The name is written by slurmstepd (src/slurmd/slurmstepd/req.c, _domain_socket_create,
    "%s/%s_%u.%u" plus ".%u" for a heterogeneous job's component) and read back by
    stepd_available() (src/common/stepd_api.c) — the same in 22.05 through master.
    """

    path: str
    node: str
    job_id: int
    step_id: int
    het: int | None     # the het job component, None for an ordinary job

    @property
    def is_extern(self) -> bool:
        """The extern step (id 0xFFFFFFFC): where pam_slurm_adopt puts adopted processes."""
        return self.step_id == EXTERN_STEP

    @property
    def is_batch(self) -> bool:
        """The batch script's step (id 0xFFFFFFFB)."""
        return self.step_id == BATCH_STEP


@dataclass(frozen=True)
class SlurmNodeConfig:
    """What the agent needs of slurm.conf and cgroup.conf, for one node (one slurmd)."""

    nodename: str            # this node's NodeName
    spool_dir: str           # SlurmdSpoolDir with %n/%h expanded for this node
    prolog_contain: bool     # PrologFlags has Contain (or X11 / RunInJob, which imply it)
    proctrack: str           # ProctrackType
    cgroup_plugin: str       # CgroupPlugin: "cgroup/v1" | "cgroup/v2" | "autodetect" | "disabled"
    cgroup_prepend: str      # the v1 prefix: "/slurm", or "/slurm_<node>" with multiple slurmd
    cgroup_mountpoint: str   # CgroupMountpoint (default /sys/fs/cgroup)
    slurm_user: str          # SlurmUser
    version: tuple[int, int] | None   # Slurm's (major, minor) if known
    # Extensions beyond the first API (defaults keep the original constructor valid):
    cgroup_slice: str = DEFAULT_CGROUP_SLICE   # CgroupSlice (v2; a key from 25.11)
    cgroup_job_id_paths: bool = False          # CgroupJobIdPaths (v2; a key from 26.05.2)
    multiple_slurmd: bool = False              # several NodeNames share this NodeHostname
    node_hostname: str = ""                    # this node's NodeHostname
    files: tuple[str, ...] = field(default=())  # the files read, in order (for logs)


# --- slurm.conf syntax -------------------------------------------------------------------

# A key, an optional operator before "=", then a double-quoted value (which may hold
# spaces) or a run of non-space characters (keyvalue_pattern in src/common/parse_config.c,
# 22.05 to master).
_KEYVALUE = re.compile(
    r'\s*([A-Za-z0-9_.]+)\s*[-*+/]?=\s*(?:"([^"]*)"|(\S+))(?:\s|$)')
_INCLUDE = re.compile(r"\s*include\s+(\S+)", re.IGNORECASE)


@dataclass(frozen=True)
class _Line:
    """One logical line of a configuration file: its key=value pairs, keys lowercased."""

    file: str
    lineno: int
    pairs: tuple[tuple[str, str], ...]

    def where(self) -> str:
        return f"{self.file}:{self.lineno}"


def _strip_comment(text: str) -> str:
    """Cut at the first "#" not escaped by an odd number of backslashes (_strip_comments)."""
    backslashes = 0
    for i, ch in enumerate(text):
        if ch == "#" and backslashes % 2 == 0:
            return text[:i]
        backslashes = backslashes + 1 if ch == "\\" else 0
    return text


def _continued(text: str) -> str | None:
    """The line without its continuation backslash if it ends in an odd number of them
    (trailing blanks ignored, as _strip_continuation does), else None."""
    stripped = text.rstrip()
    run = len(stripped) - len(stripped.rstrip("\\"))
    if run % 2 == 1:
        return stripped[:-1]
    return None


def _unescape(text: str) -> str:
    r"""Drop each backslash and keep the character after it ("\\" -> "\", "\#" -> "#")."""
    return re.sub(r"\\(.?)", r"\1", text)


def _read_lines(path: str, depth: int, cluster: list[str]) -> Iterator[_Line]:
    """The logical lines of `path`, Include lines replaced by the included files' lines.

    Include (case-insensitive, slurm.conf since long before 22.05): the file name may hold
    %c (ClusterName, lowercased, as set so far) and, when relative, is taken from the
    directory of the file that includes it (_add_full_path in parse_config.c)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            raw = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from e
    i = 0
    while i < len(raw):
        lineno = i + 1
        text = _strip_comment(raw[i])
        i += 1
        while (head := _continued(text)) is not None and i < len(raw):
            text = head + _strip_comment(raw[i])
            i += 1
        text = _unescape(text)
        if not text.strip():
            continue
        inc = _INCLUDE.match(text)
        if inc:
            name = inc.group(1)
            if "%c" in name:
                if not cluster:
                    raise ValueError(f"{path}:{lineno}: Include {name}: %c needs a "
                                     "ClusterName set before it")
                name = name.replace("%c", cluster[0].lower())
            target = name if name.startswith("/") else os.path.join(
                os.path.dirname(path), name)
            if depth >= _MAX_INCLUDE_DEPTH:
                raise ValueError(f"{path}:{lineno}: Include {name}: nested more than "
                                 f"{_MAX_INCLUDE_DEPTH} deep (a loop?)")
            if not os.path.isfile(target):
                raise ValueError(f"{path}:{lineno}: Include {target}: no such file")
            yield from _read_lines(target, depth + 1, cluster)
            continue
        pairs: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text) and text[pos:].strip():
            m = _KEYVALUE.match(text, pos)
            if not m:
                raise ValueError(f"{path}:{lineno}: cannot parse {text[pos:].strip()!r}")
            value = m.group(2) if m.group(2) is not None else m.group(3)
            pairs.append((m.group(1).lower(), value))
            pos = m.end()
        for key, value in pairs:
            if key == "clustername":
                cluster[:] = [value]
        yield _Line(path, lineno, tuple(pairs))


def _bool(value: str, line: _Line, key: str) -> bool:
    """A Slurm boolean (s_p_handle_boolean, src/common/parse_value.c, 22.05 to master)."""
    v = value.lower()
    if v in ("yes", "up", "true", "1"):
        return True
    if v in ("no", "down", "false", "0"):
        return False
    raise ValueError(f"{line.where()}: {key}={value!r} is not a boolean")


# --- hostlists ---------------------------------------------------------------------------

def expand_hostlist(expr: str) -> list[str]:
    """The names of a Slurm hostlist expression, in order.

    "n[01-03,7],gpu1" -> ["n01", "n02", "n03", "n7", "gpu1"]; several bracket groups give
    their product ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2); a range keeps the width of its
    low end when that has a leading zero (src/common/hostlist.c). ValueError when malformed.
    """
    names: list[str] = []
    for piece in _split_top(expr):
        parts = re.split(r"(\[[^\[\]]*\])", piece)
        choices: list[list[str]] = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_range(part[1:-1], expr))
            elif "[" in part or "]" in part:
                raise ValueError(f"unbalanced brackets in hostlist {expr!r}")
            else:
                choices.append([part])
        names.extend("".join(combo) for combo in itertools.product(*choices))
    return [n for n in names if n]


def _split_top(expr: str) -> list[str]:
    """Split at commas outside brackets."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(expr[start:i])
            start = i + 1
    out.append(expr[start:])
    return out


def _expand_range(body: str, expr: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in hostlist {expr!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        if int(hi) < int(lo) or int(hi) - int(lo) > 1_000_000:
            raise ValueError(f"bad range {item!r} in hostlist {expr!r}")
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


# --- slurm.conf -> SlurmNodeConfig -------------------------------------------------------

def _short(hostname: str) -> str:
    return hostname.split(".", 1)[0]


def _expand_slurmd_path(path: str, nodename: str, hostname: str) -> str:
    """%h then %n, the first of each only (slurm_conf_expand_slurmd_path, which uses
    xstrsubstitute, not xstrsubstituteall; 22.05 to master)."""
    return path.replace("%h", hostname, 1).replace("%n", nodename, 1)


def read_node_config(slurm_conf: str, nodename: str | None = None, *,
                     hostname: str | None = None,
                     version: tuple[int, int] | None = None) -> SlurmNodeConfig:
    """This node's facts from `slurm_conf` and the cgroup.conf in its directory (if any).

    Syntax as Slurm's parser (src/common/parse_config.c, 22.05 to master): keys
    case-insensitive, the latest value of a key wins, "#" comments ("\\#" escapes), a
    trailing backslash continues a line, double-quoted values may hold blanks, `Include`
    lines (relative to the including file, %c = ClusterName). Unknown keys are ignored.

    The node, when `nodename` is None, is chosen as slurmd does (slurmd.c,
    slurm_conf_get_nodename): the NodeName whose NodeHostname (default: the NodeName
    itself) equals the short host name, then the full host name, then "localhost";
    `hostname` defaults to socket.gethostname(). Several NodeNames on this host (multiple
    slurmd) need an explicit `nodename`, as slurmd needs -N.

    SlurmdSpoolDir: %h is the short host name and %n the NodeName, as slurmd expands it
    (it makes the sockets; pam_slurm_adopt's stepd_available(NULL, ...) uses NodeHostname
    for %h instead, the same unless NodeHostname differs from the host name).

    cgroup_prepend: CgroupPrepend is not a cgroup.conf key (22.05 to master): v1 uses
    "/slurm", or "/slurm_%n" when Slurm is built with --enable-multiple-slurmd; we take the
    latter when several NodeNames share this node's NodeHostname.

    ValueError naming the file and line for a missing file or an unparsable line or value,
    or when no NodeName matches.
    """
    cluster: list[str] = []
    lines = list(_read_lines(slurm_conf, 0, cluster))
    files = tuple(dict.fromkeys(ln.file for ln in lines)) or (slurm_conf,)
    top: dict[str, tuple[str, _Line]] = {}
    nodes: list[tuple[str, str, _Line]] = []   # (NodeName, NodeHostname, line)
    for ln in lines:
        first = ln.pairs[0][0]
        if first not in _RECORD_KEYS:
            for key, value in ln.pairs:
                top[key] = (value, ln)
            continue
        if first != "nodename":
            continue
        rec = dict(ln.pairs)
        if rec["nodename"].lower() == "default":
            continue
        try:
            names = expand_hostlist(rec["nodename"])
            hosts = expand_hostlist(rec["nodehostname"]) if "nodehostname" in rec else names
        except ValueError as e:
            raise ValueError(f"{ln.where()}: {e}") from e
        if not hosts:
            raise ValueError(f"{ln.where()}: empty NodeHostname")
        # Fewer host names than nodes: the last one goes on (node_conf.c, 22.05 to master;
        # only a multiple-slurmd build accepts that, e.g. NodeName=v[1-9] NodeHostname=box).
        hosts += hosts[-1:] * (len(names) - len(hosts))
        nodes.extend((n, h, ln) for n, h in zip(names, hosts, strict=False))
    if not nodes:
        raise ValueError(f"{slurm_conf}: no NodeName line")

    host = hostname if hostname is not None else socket.gethostname()
    if nodename is None:
        nodename = _match_node(nodes, host, slurm_conf)
    mine = [h for n, h, _ in nodes if n == nodename]
    if not mine:
        raise ValueError(f"{slurm_conf}: no NodeName {nodename}")
    node_hostname = mine[-1]
    multiple = sum(1 for _, h, _ in nodes if h == node_hostname) > 1

    def get(key: str, default: str) -> str:
        return top[key][0] if key in top else default

    spool = _expand_slurmd_path(get("slurmdspooldir", DEFAULT_SPOOL_DIR), nodename,
                                _short(host))
    contain = False
    if "prologflags" in top:
        value, ln = top["prologflags"]
        contain = _prolog_contain(value, ln)

    cg = _read_cgroup_conf(os.path.join(os.path.dirname(slurm_conf), "cgroup.conf"))
    return SlurmNodeConfig(
        nodename=nodename,
        spool_dir=spool,
        prolog_contain=contain,
        proctrack=get("proctracktype", DEFAULT_PROCTRACK),
        cgroup_plugin=cg.plugin,
        cgroup_prepend=f"/slurm_{nodename}" if multiple else "/slurm",
        cgroup_mountpoint=cg.mountpoint,
        slurm_user=get("slurmuser", DEFAULT_SLURM_USER),
        version=version,
        cgroup_slice=cg.slice,
        cgroup_job_id_paths=cg.job_id_paths,
        multiple_slurmd=multiple,
        node_hostname=node_hostname,
        files=files + cg.files,
    )


def _match_node(nodes: Sequence[tuple[str, str, _Line]], host: str, conf: str) -> str:
    for candidate in dict.fromkeys((_short(host), host, "localhost")):
        found = list(dict.fromkeys(n for n, h, _ in nodes if h == candidate))
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"{conf}: NodeNames {', '.join(found)} all have NodeHostname "
                             f"{candidate} (multiple slurmd): name the node")
    raise ValueError(f"{conf}: no NodeName has NodeHostname {_short(host)}, {host} "
                     "or localhost: name the node")


def _prolog_contain(value: str, line: _Line) -> bool:
    """Whether PrologFlags makes an extern step: Contain, X11 (implies Contain, 22.05 to
    master) or RunInJob (implies Contain, 24.05+); comma-separated, case-insensitive
    (prolog_str2flags in read_config.c). Flags we do not know are left to slurmd, which
    refuses them: a newer flag must not make this parser fail."""
    flags = {tok.strip().lower() for tok in value.split(",") if tok.strip()}
    if not flags:
        raise ValueError(f"{line.where()}: PrologFlags is empty")
    return bool(flags & {"contain", "x11", "runinjob"})


@dataclass(frozen=True)
class _CgroupConf:
    plugin: str = DEFAULT_CGROUP_PLUGIN
    mountpoint: str = DEFAULT_CGROUP_MOUNTPOINT
    slice: str = DEFAULT_CGROUP_SLICE
    job_id_paths: bool = False
    files: tuple[str, ...] = ()


def _read_cgroup_conf(path: str) -> _CgroupConf:
    """CgroupPlugin, CgroupMountpoint (one trailing "/" dropped, as Slurm does), CgroupSlice
    (25.11+), CgroupJobIdPaths (26.05.2+). Defaults when the file is absent."""
    if not os.path.exists(path):
        return _CgroupConf()
    lines = list(_read_lines(path, 0, []))
    values: dict[str, tuple[str, _Line]] = {}
    for ln in lines:
        for key, value in ln.pairs:
            values[key] = (value, ln)
    conf = _CgroupConf(files=tuple(dict.fromkeys(ln.file for ln in lines)) or (path,))
    if "cgroupplugin" in values:
        value, ln = values["cgroupplugin"]
        if value not in CGROUP_PLUGINS:
            raise ValueError(f"{ln.where()}: CgroupPlugin={value!r}: not one of "
                             f"{', '.join(CGROUP_PLUGINS)}")
        conf = replace(conf, plugin=value)
    if "cgroupmountpoint" in values:
        value = values["cgroupmountpoint"][0]
        conf = replace(conf, mountpoint=value[:-1] if len(value) > 1 and value.endswith("/")
                       else value)
    if "cgroupslice" in values:
        conf = replace(conf, slice=values["cgroupslice"][0].strip("/"))
    if "cgroupjobidpaths" in values:
        value, ln = values["cgroupjobidpaths"]
        conf = replace(conf, job_id_paths=_bool(value, ln, "CgroupJobIdPaths"))
    return conf


# --- the spool dir -----------------------------------------------------------------------

def step_sockets(spool_dir: str, nodename: str) -> list[StepSocket]:
    """The stepd sockets of `nodename` in `spool_dir`, sorted by (job, step, het).

    Only names `<nodename>_<jobid>.<stepid>[.<het>]` that are sockets count (the spool dir
    also holds job<N> directories, cred_state files, and other nodes' sockets with
    multiple slurmd). Slurm's own reader (stepd_available, 22.05 to master) matches the
    name with a regex built from the unescaped node name and without checking the file
    type; we escape the name, require digits and a socket, and drop ids above 32 bits.
    OSError when the directory cannot be listed.
    """
    pattern = re.compile(re.escape(nodename) + r"_(\d+)\.(\d+)(?:\.(\d+))?")
    found: list[StepSocket] = []
    for name in os.listdir(spool_dir):
        m = pattern.fullmatch(name)
        if not m:
            continue
        path = os.path.join(spool_dir, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue    # Race: the step ended between the listing and the lstat.
        if not stat.S_ISSOCK(mode):
            continue
        job, step = int(m.group(1)), int(m.group(2))
        het = int(m.group(3)) if m.group(3) is not None else None
        if max(job, step, het or 0) > 0xFFFFFFFF:
            continue
        found.append(StepSocket(path, nodename, job, step, het))
    found.sort(key=lambda s: (s.job_id, s.step_id, -1 if s.het is None else s.het, s.path))
    return found


# --- cgroup path -> job ------------------------------------------------------------------

_JOB_DIR = re.compile(r"job_(\d+)")
#: A SLUID as print_sluid() writes it (src/common/sluid.c, 25.05+): "s" and 13 Crockford
#: base32 digits. cgroup/v2 names the job's directory so from 26.05.0 (always in 26.05.0
#: and 26.05.1; unless CgroupJobIdPaths=yes from 26.05.2).
SLUID = re.compile(r"s[0-9ABCDEFGHJKMNPQRSTVWXYZ]{13}")


def job_of_cgroup(path: str, cfg: SlurmNodeConfig) -> int | None:
    """The Slurm job id a cgroup path names unambiguously, else None.

    `path` is the path field of a /proc/<pid>/cgroup line (relative to the reader's cgroup
    namespace root). Layouts (src/plugins/cgroup/v1/xcgroup.c, v2/cgroup_v2.c):

    - v1 (22.05 to master): `<prepend>/uid_<uid>/job_<id>[/step_<s>[/...]]` from the
      hierarchy's root; prepend "/slurm", or "/slurm_<node>" when built for multiple
      slurmd — both are accepted for this node, another node's "/slurm_<other>" is not.
      "/slurm/uid_1000/job_42/step_extern" -> 42.
    - v2: `[<init>/]<slice>/<scope>/job_<id>[/...]`, slice "system.slice" or CgroupSlice
      (25.11+), scope "slurmstepd.scope" or "<node>_slurmstepd.scope" (multiple slurmd);
      `<init>` is the parent of pid 1's cgroup when slurmd runs in a container (24.11+).
      "/system.slice/slurmstepd.scope/job_42/step_0/user/task_0" -> 42.
    - v2 from 26.05 names the job directory by its SLUID ("sEKNKTV3WPV500") unless
      CgroupJobIdPaths=yes: None, as for the scope's own "system" cgroup, a path outside
      the namespace ("/.."), or anything else. The caller then asks the stepds
      (REQUEST_PID_IN_CONTAINER).

    With CgroupPlugin=autodetect both layouts are tried (they cannot be confused);
    "disabled" gives None.
    """
    if not path.startswith("/"):
        return None
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    plugin = cfg.cgroup_plugin
    if plugin in ("cgroup/v1", "autodetect"):
        job = _job_v1(parts, cfg)
        if job is not None:
            return job
    if plugin in ("cgroup/v2", "autodetect"):
        return _job_v2(parts, cfg)
    return None


def _job_id(name: str) -> int | None:
    m = _JOB_DIR.fullmatch(name)
    if m and int(m.group(1)) <= 0xFFFFFFFF:
        return int(m.group(1))
    return None


def _job_v1(parts: list[str], cfg: SlurmNodeConfig) -> int | None:
    for prepend in dict.fromkeys((cfg.cgroup_prepend, "/slurm", f"/slurm_{cfg.nodename}")):
        pre = [p for p in prepend.split("/") if p]
        n = len(pre)
        if parts[:n] != pre or len(parts) < n + 2:
            continue
        if not re.fullmatch(r"uid_\d+", parts[n]):
            return None
        job = _job_id(parts[n + 1])
        if job is None:
            return None
        if len(parts) > n + 2 and not parts[n + 2].startswith("step_"):
            return None
        return job
    return None


def _job_v2(parts: list[str], cfg: SlurmNodeConfig) -> int | None:
    slice_parts = [p for p in cfg.cgroup_slice.split("/") if p]
    scopes = ("slurmstepd.scope", f"{cfg.nodename}_slurmstepd.scope")
    k = len(slice_parts)
    for i in range(k, len(parts) - 1):
        if parts[i] in scopes and parts[i - k:i] == slice_parts:
            job = _job_id(parts[i + 1])
            if job is None:
                return None     # a SLUID (26.05+), the scope's "system" cgroup, ...
            if len(parts) > i + 2 and not parts[i + 2].startswith("step_"):
                return None
            return job
    return None


# --- versions ----------------------------------------------------------------------------

_VERSION = re.compile(r"\bslurm(?:-wlm)?\s+(\d+)\.(\d+)(?:\.\d+)?", re.IGNORECASE)


def parse_slurm_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from `slurmd -V` / `sinfo -V` output, else None.

    Both print "PACKAGE_NAME SLURM_VERSION_STRING" (print_slurm_version, proc_args.c, 22.05
    to master): "slurm 22.05.8" -> (22, 5); Debian's slurm-wlm builds say the same.
    """
    m = _VERSION.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def probe_slurm_version(argv: Sequence[str] = ("slurmd", "-V"),
                        timeout: float = 5.0) -> tuple[int, int] | None:
    """Run `argv` (default `slurmd -V`) and parse its output; None when it cannot run,
    fails, or says nothing we understand."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return parse_slurm_version(done.stdout + done.stderr)


def detect_cgroup_plugin(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """What CgroupPlugin=autodetect picks on this host, read from `mountinfo`.

    Slurm (autodetect_cgroup_version, 22.05 to master) looks at /sys/fs/cgroup whatever
    CgroupMountpoint says: cgroup2 -> "cgroup/v2"; tmpfs -> by /sys/fs/cgroup/systemd:
    cgroup2 -> "cgroup/v2" (needs /sys/fs/cgroup/unified, not checked here), cgroup (v1)
    -> "cgroup/v1". None when neither applies or the file cannot be read.
    """
    fstype: dict[str, str] = {}
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                left, sep, right = line.partition(" - ")
                fields = left.split()
                if sep and len(fields) >= 5 and right.split():
                    fstype[fields[4]] = right.split()[0]   # the last mount on top wins
    except OSError:
        return None
    root = fstype.get("/sys/fs/cgroup")
    if root == "cgroup2":
        return "cgroup/v2"
    if root == "tmpfs":
        sysd = fstype.get("/sys/fs/cgroup/systemd")
        if sysd == "cgroup2":
            return "cgroup/v2"
        if sysd == "cgroup":
            return "cgroup/v1"
    return None


def newest_rule(version: tuple[int, int] | None, cgroup_plugin: str, *,
                mountinfo: str = "/proc/self/mountinfo") -> str:
    """Which job pam_slurm_adopt of `version` calls "newest" among a user's extern steps:

    - "ctime" (26.05+): the latest ctime of the stepd socket, ties to the larger job id
      (_sort_steps_by_start_time; stepd_available fills start_time from st_ctime);
    - "mtime" (22.05 to 25.11, cgroup/v1): the latest st_mtime of
      `<mount>/<ctrl>/slurm[_<nodename= option>]/uid_<uid>/job_<id>`, ctrl by what is
      constrained (memory, cpuset, devices, else freezer); a tie goes to the later step in
      the listing (">=" in _indeterminate_multiple);
    - "jobid" (22.05 to 25.11, cgroup/v2): the highest job id.

    An unknown version counts as before 26.05 (Debian bookworm ships 22.05.8).
    "autodetect" is resolved with detect_cgroup_plugin(mountinfo); ValueError when that
    or `cgroup_plugin` gives neither v1 nor v2.
    """
    if version is not None and version >= (26, 5):
        return "ctime"
    plugin = cgroup_plugin
    if plugin == "autodetect":
        plugin = detect_cgroup_plugin(mountinfo) or "autodetect"
    if plugin == "cgroup/v1":
        return "mtime"
    if plugin == "cgroup/v2":
        return "jobid"
    raise ValueError(f"no newest rule for CgroupPlugin={cgroup_plugin} "
                     f"(resolved to {plugin}) before Slurm 26.05")
