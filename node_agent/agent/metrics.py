"""Prometheus metrics of the agent: requests, latencies, caller-ID answers by outcome.

Served on `metrics_listen` (plain HTTP, `/metrics`) when configured. The interceptor
times every RPC and counts it by method and status code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from node_agent.auth import ServerInterceptor, wrap_handler

REQUESTS = Counter("callerid_agent_requests", "gRPC requests served",
                   ["method", "code"])
LATENCY = Histogram("callerid_agent_request_seconds", "gRPC request latency", ["method"],
                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                             0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
RESOLVE_SECONDS = Histogram("callerid_agent_resolve_seconds",
                            "caller-ID resolution time (connection -> job)",
                            buckets=(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
                                     0.001, 0.0025, 0.01, 0.1, 1.0))
ANSWERS = Counter("callerid_agent_callerid_answers", "caller-ID answers by outcome",
                  ["outcome"])
ADMISSIONS = Histogram("callerid_agent_admission_seconds",
                       "time to decide (and adopt) an ssh login, by decision and reason",
                       ["decision", "reason"],
                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
                                0.5, 1.0, 2.0, 5.0))
JOBS = Gauge("callerid_agent_jobs", "jobs of this node (from the job backend)")
INDEX_JOBS = Gauge("callerid_agent_index_jobs",
                   "jobs of other nodes this agent is a home of (the job index)")


def serve(listen: str) -> None:
    """Start the HTTP endpoint on "host:port" ("[v6]:port" accepted)."""
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]"))


class MetricsInterceptor(ServerInterceptor):
    """Counts and times every call, by method and status code."""
    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        """The handler, wrapped to record the call's metrics."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def wrap_fn(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def timed(request: Any, context: grpc.ServicerContext) -> Any:
                t0 = time.perf_counter()
                code = grpc.StatusCode.OK
                try:
                    return behaviour(request, context)
                except Exception:
                    code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
                    raise
                finally:
                    LATENCY.labels(method).observe(time.perf_counter() - t0)
                    REQUESTS.labels(method, code.name).inc()
            return timed

        return wrap_handler(handler, wrap_fn)
