"""Build and run the node agent.

`create_server()` builds a gRPC server with every service and interceptor and binds it;
it does not start it (tests bind port 0 and start/stop it themselves). `run()` is the
daemon: it checks the configuration and munged, opens the job backend, serves,
tells systemd it is ready (Type=notify) and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Container, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from callerid import Resolver
from node_agent import relaybuf, shellwire
from node_agent.agent import metrics
from node_agent.agent.admission import Admission, AdmissionServer
from node_agent.agent.jobindex import SEND_TIMEOUT, Announcer, JobIndex, Share
from node_agent.agent.limits import SessionLimits
from node_agent.agent.service import NodeAgentServicer
from node_agent.agent.sessions import JobShellSessions
from node_agent.agent.warmup import LoginWatch, MigrationWarmer
from node_agent.auth import (
    Authenticator,
    AuthInterceptor,
    MungeAuthenticator,
    NodeTargets,
    ServerInterceptor,
)
from node_agent.client import PeerPool
from node_agent.config import AgentConfig
from node_agent.errors import StartupError
from node_agent.jobs import open_backend
from node_agent.jobs.base import RUNNING, JobBackend
from node_agent.proto.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger("node_agent")

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].full_name


# Clients ping every 5 s (dial.KEEPALIVE_OPTIONS), also while an ssh-to-job session is
# idle: accept that instead of answering with GOAWAY ("too many pings"). The server pings
# too, so a client that vanished ends its session within seconds. The option's name is
# gRPC's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, whose string has no
# "recv" in it; a name gRPC does not know is ignored without a word (then the default,
# 5 min, ended every session idle for ~15 s: tests/integration/test_ssh_job_proxy.py).
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 4000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
]


# -- who runs which call ------------------------------------------------------------------
# grpc's sync server takes a thread for a call as soon as the call arrives: it submits the
# whole call (interceptors' wrappers, handler, every response of a stream) to an executor
# before the handler has seen a byte, and a plain ThreadPoolExecutor queues what it cannot
# run yet. With one pool for every method, 64 streams that never send anything held all 64
# threads, and CallerId, ListJobs and the job methods queued behind them until they
# timed out (another user's login then landed in the wrong job).
#
# So ssh-to-job streams run in a pool of their own, the control methods in the server's
# pool, and neither can take the other's threads. Within the session pool, a stream takes
# a slot under the caps the moment its handler starts (node_agent/agent/limits.py), so streams
# and sessions hold at most max_sessions of its threads for longer than a refusal takes,
# and the SPARE_WORKERS beyond that authenticate and refuse the streams past a cap at once.
# (A cancelled session frees its slot when its call ends, and its thread a moment later,
# after the clean-up: a burst of cancellations can briefly use some spare threads.)
#
# grpc runs a method whose behaviour carries an `experimental_thread_pool` attribute in
# that pool instead of the server's (grpc/_server.py, _select_thread_pool_for_behavior;
# there since 2019, and grpc's own health service sets it on Watch). The alternatives
# were worse: an asyncio server would mean rewriting every servicer and the relay; an
# executor that routes by looking inside the callables grpc submits depends on more of
# grpc's internals, and one shared pool with a reserve for the control methods would still
# queue CallerId behind a flood of refused streams. The attribute must sit on the
# outermost behaviour (interceptors rebuild handlers and drop attributes), hence the
# interceptor that runs first; `_check_own_pools` refuses to start on a grpc that would
# ignore it, rather than silently sharing one pool again.


class OwnThreadPool(ServerInterceptor):
    """Runs the calls of the given methods in their own thread pool (outermost
    interceptor: it must see the handler the other interceptors built)."""

    def __init__(self, pools: dict[str, futures.ThreadPoolExecutor]) -> None:
        self._pools = pools

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        """The handler, run in this interceptor's pool when its method is one of the
        pool's."""
        handler = continuation(handler_call_details)
        pool = self._pools.get(handler_call_details.method)
        if handler is None or pool is None:
            return handler
        return _in_pool(handler, pool)


def _in_pool(handler: Any, pool: futures.ThreadPoolExecutor) -> Any:
    """The same handler, its behaviour marked to run in `pool`. A fresh function each
    time: the behaviour underneath may be shared with other handlers."""
    for kind, make in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                       ("unary_stream", grpc.unary_stream_rpc_method_handler),
                       ("stream_unary", grpc.stream_unary_rpc_method_handler),
                       ("stream_stream", grpc.stream_stream_rpc_method_handler)):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            def run(request: Any, context: grpc.ServicerContext,
                    _behaviour: Callable[..., Any] = behaviour) -> Any:
                return _behaviour(request, context)
            run.experimental_thread_pool = pool  # type: ignore[attr-defined]
            return make(run, handler.request_deserializer, handler.response_serializer)
    return handler


def _check_own_pools() -> None:
    """StartupError unless this grpc runs a marked behaviour in its own pool."""
    mine, other = futures.ThreadPoolExecutor(1), futures.ThreadPoolExecutor(1)
    try:
        probe = _in_pool(grpc.stream_stream_rpc_method_handler(lambda r, c: r), mine)
        select = getattr(importlib.import_module("grpc._server"),
                         "_select_thread_pool_for_behavior", None)
        if select is None or select(probe.stream_stream, other) is not mine:
            raise StartupError(
                f"grpcio {grpc.__version__} does not run a method in a thread pool of its "
                f"own (experimental_thread_pool): ssh-to-job sessions would take the "
                f"threads CallerId needs (see node_agent/agent/server.py)")
    finally:
        mine.shutdown()
        other.shutdown()


def create_server(servicer: NodeAgentServicer, authenticator: Authenticator,
                  addresses: Sequence[str], *, max_workers: int = 16,
                  targets: Container[str] | None = None,
                  ) -> tuple[grpc.Server, list[int]]:
    """A bound, not yet started server. Returns it and the port bound for each address
    (0 for unix: addresses); "host:0" binds an ephemeral port. `targets` are the claims
    a credential may name to be accepted here (auth.NodeTargets; default: the servicer's
    node name and the addresses of this network namespace).

    `max_workers` threads serve every method but OpenJobShell; ssh-to-job streams get
    `servicer.limits.pool_size` threads of their own (see above)."""
    _check_own_pools()
    limits: SessionLimits = servicer.limits
    sessions = futures.ThreadPoolExecutor(max_workers=limits.pool_size,
                                          thread_name_prefix="session")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=[OwnThreadPool({shellwire.METHOD: sessions}),
                      metrics.MetricsInterceptor(),
                      AuthInterceptor(authenticator, targets or NodeTargets(servicer.node))],
        options=SERVER_OPTIONS,
    )
    # OpenJobShell's frames go through shellwire's (de)serializers, not the generated
    # ones: the same bytes on the wire, without protobuf's copies of the ssh stream. The
    # generated registration adds a generic handler (asked in order: ours goes first) and
    # a registered one (a dict: ours goes after).
    shell = {"OpenJobShell": grpc.stream_stream_rpc_method_handler(
        servicer.OpenJobShell, request_deserializer=shellwire.parse,
        response_serializer=shellwire.serialize)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, shell),))
    agent_pb2_grpc.add_NodeAgentServicer_to_server(servicer, server)
    server.add_registered_method_handlers(SERVICE_NAME, shell)  # type: ignore[attr-defined]
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    ports = []
    for addr in addresses:
        try:
            port = server.add_insecure_port(addr)
        except RuntimeError as e:
            raise StartupError(f"cannot listen on {addr}: {e}") from None
        if port == 0 and not addr.startswith("unix:"):
            raise StartupError(f"cannot listen on {addr} (address in use or not on this node?)")
        ports.append(port)
    return server, ports


def sd_notify(state: str) -> None:
    """The sd_notify(3) protocol with the stdlib: one datagram to $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    # Like sd_notify(3), a manager that went away is not an error.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as e:
        log.debug("sd_notify(%r) to %s: %s", state.split("\n")[0], path, e)


def _prepare_socket(path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        if stat.S_ISSOCK(p.lstat().st_mode):
            p.unlink()  # stale, from a previous run: systemd runs one agent at a time
        else:
            raise StartupError(f"{p} exists and is not a socket; refusing to replace it")
    except FileNotFoundError:
        pass


def unprivileged_port_start(procfs: str = "/proc") -> int:
    """The lowest port any user may bind in this network namespace (1024 unless a
    site or a container runtime lowered it)."""
    try:
        with open(f"{procfs}/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def warn_if_port_unprivileged(port: int, procfs: str = "/proc") -> bool:
    """Log a warning when users may bind the agent's port here; True when they may."""
    start = unprivileged_port_start(procfs)
    if port < start:
        return False
    log.warning("port %d is not privileged on this node (net.ipv4.ip_unprivileged_port_start "
                "= %d): any user could listen on it while the agent is down. Clients still "
                "refuse whatever answers without the agent's credential, but choose a port "
                "below %d", port, start, start)
    return True


def job_index(config: AgentConfig) -> JobIndex | None:
    """This agent's half of the job index (node_agent/agent/jobindex.py): with `nodes` and
    the native registry only (a scheduler knows where its jobs run), and only when this
    node is one of `nodes` (else the homes could not tell it from an impostor)."""
    nodes = config.node_names()
    if config.backend != "native" or not nodes:
        return None
    if config.node_name not in nodes:
        log.warning("node_name %s is not in nodes (%s): this node's jobs are found by "
                    "the fan-out only, not through the job index", config.node_name,
                    config.nodes)
        return None
    return JobIndex(nodes)


def announcer_of(config: AgentConfig, jobs: JobBackend, index: JobIndex,
                 peers: PeerPool) -> Announcer:
    """The announcer of this node's running jobs to their homes (this node's own index
    directly, the others through their agents)."""

    def running() -> list[tuple[str, int]]:
        return [(r.job.id, r.job.uid) for r in jobs.list_jobs() if r.state == RUNNING]

    def send(home: str, share: Share) -> None:
        if home == config.node_name:
            index.replace(home, share)
        else:
            peers.announce_jobs(home, config.node_name, share, timeout=SEND_TIMEOUT)

    return Announcer(config.node_names(), running, send)


def run(config: AgentConfig, authenticator: Authenticator | None = None) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    if os.geteuid() != 0:
        raise StartupError("the node agent must run as root (it creates cgroups and reads "
                           "other users' /proc/<pid>/fd)")
    auth = authenticator or MungeAuthenticator(config.munge.socket, config.munge.library)
    if isinstance(auth, MungeAuthenticator):
        auth.self_test()
    # Everything made from here on is undone in reverse order, on a start-up failure
    # too (a helper process or a socket must not outlive a failed start).
    with contextlib.ExitStack() as undo:
        jobs = open_backend(config)
        undo.callback(jobs.close)
        if why := jobs.why_no_jobs():
            log.warning("no ssh login can join a job on this node: %s", why)
        # Read at scrape time: jobs also end on their own (main process exit).
        metrics.JOBS.set_function(lambda: len(jobs.list_jobs()))
        resolver = Resolver(jobs, procfs=config.procfs, use_netlink=config.use_netlink)
        undo.callback(resolver.close)
        warmer = MigrationWarmer(jobs.scratch_cgroups())
        undo.callback(warmer.close)
        shells = JobShellSessions(jobs, config.session_dir, config.node_name,
                                  procfs=config.procfs, warmer=warmer)
        shells.recover()   # no session survives a restart: remove what earlier ones left
        relaybuf.keep_buffers_in_heap()  # ssh-to-job's relay: no page fault per byte
        index = job_index(config)
        if index is not None:
            metrics.INDEX_JOBS.set_function(lambda: len(index))
        servicer = NodeAgentServicer(
            node=config.node_name, resolver=resolver, jobs=jobs,
            admin_uids=config.admin_uids, shells=shells,
            limits=SessionLimits(config.max_sessions, config.max_sessions_per_user,
                                 config.session_open_timeout),
            index=index)
        peers = PeerPool(auth, config.port)
        undo.callback(peers.close)
        _prepare_socket(config.socket)
        addresses = [f"unix:{config.socket}", *config.listen]
        server, _ = create_server(servicer, auth, addresses, max_workers=config.max_workers,
                                  targets=NodeTargets(config.node_name))
        warn_if_port_unprivileged(config.port, config.procfs)
        undo.callback(lambda: server.stop(grace=5).wait())
        watch = LoginWatch(warmer.expect_login, config.login_services)
        undo.callback(watch.close)
        admission = AdmissionServer(
            config.admission_socket,
            Admission(jobs, peers.caller_id, rpc_timeout=config.rpc_timeout,
                      warmer=warmer))
        undo.callback(admission.close)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        server.start()
        admission.start()
        if index is not None:
            announcer = announcer_of(config, jobs, index, peers)
            announcer.start()
            undo.callback(announcer.close)
        # Anyone may connect; every call is authenticated with MUNGE.
        os.chmod(config.socket, 0o666)
        if config.metrics_listen:
            try:
                metrics.serve(config.metrics_listen)
            except OSError as e:
                raise StartupError(
                    f"cannot serve metrics on {config.metrics_listen}: {e}") from None
        log.info("node agent for %s serving on %s, admission on %s (%d jobs)%s",
                 config.node_name, ", ".join(addresses), config.admission_socket,
                 len(jobs.list_jobs()),
                 f", metrics on {config.metrics_listen}" if config.metrics_listen else "")
        sd_notify(f"READY=1\nSTATUS=serving {len(jobs.list_jobs())} jobs\n"
                  f"MAINPID={os.getpid()}")
        undo.callback(log.info, "stopping")
        undo.callback(sd_notify, "STOPPING=1")
        stop.wait()
