"""callerid: who is on the other end of this TCP connection, and which job is it in?

A pure, stdlib-only library for Linux: /proc and netlink readers, the connection -> inode
-> pid -> job resolution chain, cgroup v1/v2 job operations and the job model. It knows
no scheduler, no gRPC and none of the other packages of this project. Every root path
(procfs, cgroupfs) is a parameter, so tests point it at fake trees.

The implementation lives in private modules; this module re-exports the public API:

- addresses: :class:`Endpoint`, :class:`Connection`, :func:`normalize_ip` (``_addr``)
- ``/proc/net/tcp{,6}``: :func:`decode_address`, :func:`parse_tcp_table`,
  :func:`read_tcp_tables`, :func:`find_in_tables` (``_procnet``)
- netlink sock_diag: :class:`SockDiag`, :class:`DiagSocket` (``_diag``); this namespace's
  addresses: :func:`local_addresses` (``_ifaddr``)
- processes: :func:`find_socket_owner`, :func:`read_proc_cgroups`, ... (``_procfs``)
- jobs and cgroups: :class:`Job`, :func:`validate_job_id`, :class:`CgroupLayout` (``_jobs``,
  ``_cgroup``)
- resolution: :class:`Resolver`, :class:`Resolution` (``_resolve``)
- errors: :class:`Error` and its subclasses (``_errors``)
"""

from ._addr import Connection, Endpoint, IPAddress, normalize_ip
from ._cgroup import CgroupConfig, CgroupLayout, Hierarchy
from ._diag import DiagSocket, SockDiag
from ._errors import CgroupError, Error, InvalidJobId, KernelFormatError, NetlinkUnavailable
from ._ifaddr import local_addresses
from ._jobs import JOB_ID_MAX_LEN, Job, validate_job_id
from ._procfs import (
    ProcCgroup,
    WalkStats,
    find_socket_owner,
    find_socket_owner_all,
    netns_inode,
    pids,
    proc_start_ticks,
    proc_uid,
    read_proc_cgroups,
)
from ._procnet import (
    TCP_CLOSE,
    TCP_CLOSE_WAIT,
    TCP_CLOSING,
    TCP_ESTABLISHED,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_LAST_ACK,
    TCP_LISTEN,
    TCP_NEW_SYN_RECV,
    TCP_STATE_NAMES,
    TCP_SYN_RECV,
    TCP_SYN_SENT,
    TCP_TIME_WAIT,
    TcpSocket,
    decode_address,
    find_in_tables,
    parse_tcp_table,
    read_tcp_tables,
)
from ._resolve import (
    METHOD_CGROUP_ID,
    METHOD_FD_WALK,
    METHOD_NOT_FOUND,
    METHOD_PROCFS_SCAN,
    JobLocator,
    Resolution,
    Resolver,
    SocketLookup,
    Step,
)

__all__ = [
    # errors
    "CgroupError",
    "Error",
    "InvalidJobId",
    "KernelFormatError",
    "NetlinkUnavailable",
    # addresses
    "Connection",
    "Endpoint",
    "IPAddress",
    "normalize_ip",
    "local_addresses",
    # /proc/net/tcp
    "TCP_CLOSE",
    "TCP_CLOSE_WAIT",
    "TCP_CLOSING",
    "TCP_ESTABLISHED",
    "TCP_FIN_WAIT1",
    "TCP_FIN_WAIT2",
    "TCP_LAST_ACK",
    "TCP_LISTEN",
    "TCP_NEW_SYN_RECV",
    "TCP_STATE_NAMES",
    "TCP_SYN_RECV",
    "TCP_SYN_SENT",
    "TCP_TIME_WAIT",
    "TcpSocket",
    "decode_address",
    "find_in_tables",
    "parse_tcp_table",
    "read_tcp_tables",
    # sock_diag
    "DiagSocket",
    "SockDiag",
    # processes
    "ProcCgroup",
    "WalkStats",
    "find_socket_owner",
    "find_socket_owner_all",
    "netns_inode",
    "pids",
    "proc_start_ticks",
    "proc_uid",
    "read_proc_cgroups",
    # jobs and cgroups
    "JOB_ID_MAX_LEN",
    "CgroupConfig",
    "CgroupLayout",
    "Hierarchy",
    "Job",
    "validate_job_id",
    # resolution
    "METHOD_CGROUP_ID",
    "METHOD_FD_WALK",
    "METHOD_NOT_FOUND",
    "METHOD_PROCFS_SCAN",
    "JobLocator",
    "Resolution",
    "Resolver",
    "SocketLookup",
    "Step",
]
