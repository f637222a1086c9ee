"""Identity on every gRPC call: MUNGE credentials, and the server interceptor.

Every call to an agent carries a MUNGE credential in the `x-munge-cred` metadata
entry. Its payload is the full method name, so a credential minted for one method
cannot be replayed against another; munged itself rejects a second decode of the
same credential ("Replayed credential"). The server interceptor decodes it into the
caller's uid/gid before the servicer runs; the servicer reads it with
`current_identity()`.

`Authenticator` is the interface; `MungeAuthenticator` talks to munged through
libmunge with ctypes (about 0.2 ms a pair; the `munge` CLI costs ~2.5 ms). Unit tests
inject a fake authenticator. The health and reflection services are exempt so that
standard gRPC tools work; they reveal nothing about jobs.
"""

from __future__ import annotations

import contextvars
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from node_agent.errors import AuthError

if TYPE_CHECKING:  # grpc-stubs makes these generic; the runtime classes are not.
    ServerInterceptor = grpc.ServerInterceptor[Any, Any]
    _UUClient = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _USClient = grpc.UnaryStreamClientInterceptor[Any, Any]
    _SUClient = grpc.StreamUnaryClientInterceptor[Any, Any]
    _SSClient = grpc.StreamStreamClientInterceptor[Any, Any]
else:
    ServerInterceptor = grpc.ServerInterceptor
    _UUClient = grpc.UnaryUnaryClientInterceptor
    _USClient = grpc.UnaryStreamClientInterceptor
    _SUClient = grpc.StreamUnaryClientInterceptor
    _SSClient = grpc.StreamStreamClientInterceptor

METADATA_KEY = "x-munge-cred"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

log = logging.getLogger("node_agent.auth")


@dataclass(frozen=True)
class Identity:
    """Who is calling, as vouched for by the authenticator."""

    uid: int
    gid: int


class Authenticator(Protocol):
    """Mints credentials (client side) and verifies them (server side)."""

    def encode(self, payload: bytes) -> str: ...

    def decode(self, credential: str) -> tuple[Identity, bytes]:
        """Return the identity and payload, or raise AuthError."""
        ...


# munge.h: enum munge_opt
_MUNGE_OPT_SOCKET = 8
# munge.h: enum munge_err
_EMUNGE_SOCKET = 6
_EMUNGE_CRED_REPLAYED = 17


class MungeAuthenticator:
    """MUNGE through libmunge.so.2 (ctypes); one munge context per call, since a
    context is not thread-safe and munge_decode writes into it."""

    def __init__(self, socket_path: str = "/run/munge/munge.socket.2",
                 library: str = "libmunge.so.2") -> None:
        self.socket_path = socket_path
        try:
            self._lib = ctypes.CDLL(library, use_errno=True)
        except OSError as e:
            raise AuthError(
                f"cannot load {library} ({e}); install the libmunge2 package"
            ) from None
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(libc_name)
        self._libc.free.argtypes = [ctypes.c_void_p]
        self._libc.free.restype = None
        lib = self._lib
        lib.munge_ctx_create.restype = ctypes.c_void_p
        lib.munge_ctx_create.argtypes = []
        lib.munge_ctx_destroy.restype = None
        lib.munge_ctx_destroy.argtypes = [ctypes.c_void_p]
        # munge_ctx_set is variadic; on x86-64 SysV a char* in the variadic slot
        # is passed like a fixed argument.
        lib.munge_ctx_set.restype = ctypes.c_int
        lib.munge_ctx_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
        lib.munge_ctx_strerror.restype = ctypes.c_char_p
        lib.munge_ctx_strerror.argtypes = [ctypes.c_void_p]
        lib.munge_strerror.restype = ctypes.c_char_p
        lib.munge_strerror.argtypes = [ctypes.c_int]
        lib.munge_encode.restype = ctypes.c_int
        lib.munge_encode.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
        ]
        lib.munge_decode.restype = ctypes.c_int
        lib.munge_decode.argtypes = [
            ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
        ]

    def _ctx(self) -> int:
        ctx = self._lib.munge_ctx_create()
        if not ctx:
            raise AuthError("munge_ctx_create failed (out of memory)")
        rc = self._lib.munge_ctx_set(ctx, _MUNGE_OPT_SOCKET, self.socket_path.encode())
        if rc != 0:
            self._lib.munge_ctx_destroy(ctx)
            raise AuthError(f"cannot use MUNGE socket {self.socket_path}: {self._strerror(rc)}")
        return int(ctx)

    def _strerror(self, rc: int, ctx: int | None = None) -> str:
        msg = self._lib.munge_ctx_strerror(ctx) if ctx else None
        if not msg:
            msg = self._lib.munge_strerror(rc)
        return (msg or b"unknown MUNGE error").decode(errors="replace")

    def _error(self, rc: int, ctx: int, doing: str) -> AuthError:
        text = self._strerror(rc, ctx)
        if rc == _EMUNGE_SOCKET:
            return AuthError(
                f"munged is not reachable at {self.socket_path} ({text}); is munged running?",
                unavailable=True,
            )
        return AuthError(f"MUNGE {doing} failed: {text}",
                         replayed=rc == _EMUNGE_CRED_REPLAYED)

    def encode(self, payload: bytes) -> str:
        ctx = self._ctx()
        try:
            out = ctypes.c_void_p()
            buf = ctypes.create_string_buffer(payload, len(payload))
            rc = self._lib.munge_encode(ctypes.byref(out), ctx, buf, len(payload))
            if rc != 0 or out.value is None:
                raise self._error(rc, ctx, "encode")
            try:
                return ctypes.string_at(out.value).decode("ascii")
            finally:
                self._libc.free(out)
        finally:
            self._lib.munge_ctx_destroy(ctx)

    def decode(self, credential: str) -> tuple[Identity, bytes]:
        try:
            cred = credential.encode("ascii")
        except UnicodeEncodeError:
            raise AuthError("malformed MUNGE credential") from None
        ctx = self._ctx()
        try:
            buf = ctypes.c_void_p()
            length = ctypes.c_int()
            uid = ctypes.c_uint()
            gid = ctypes.c_uint()
            rc = self._lib.munge_decode(cred, ctx, ctypes.byref(buf), ctypes.byref(length),
                                        ctypes.byref(uid), ctypes.byref(gid))
            try:
                if rc != 0:
                    raise self._error(rc, ctx, "decode")
                payload = (ctypes.string_at(buf.value, length.value)
                           if buf.value is not None else b"")
            finally:
                # The payload is allocated even for some errors (munge.h).
                if buf.value:
                    self._libc.free(buf)
            return Identity(uid.value, gid.value), payload
        finally:
            self._lib.munge_ctx_destroy(ctx)

    def self_test(self) -> None:
        """Round-trip one credential: fails early and clearly when munged is down."""
        if not os.path.exists(self.socket_path):
            raise AuthError(
                f"munged is not running: no socket at {self.socket_path}", unavailable=True
            )
        self.decode(self.encode(b"self-test"))


_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "callerid_identity", default=None
)


def current_identity() -> Identity:
    """The verified caller of the RPC being served (set by AuthInterceptor)."""
    ident = _identity.get()
    if ident is None:  # only reachable if a servicer is called without the interceptor
        raise AuthError("no authenticated identity for this call")
    return ident


def wrap_handler(handler: grpc.RpcMethodHandler[Any, Any],
          wrap_fn: Callable[[Callable[..., Any]], Callable[..., Any]],
          ) -> grpc.RpcMethodHandler[Any, Any]:
    """Rebuild a method handler with its behaviour wrapped (grpc has no helper for this)."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_fn(handler.unary_unary), handler.request_deserializer,
            handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_fn(handler.unary_stream), handler.request_deserializer,
            handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_fn(handler.stream_unary), handler.request_deserializer,
            handler.response_serializer)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        wrap_fn(handler.stream_stream), handler.request_deserializer,
        handler.response_serializer)


class AuthInterceptor(ServerInterceptor):
    """Decodes the MUNGE credential of every call; refuses calls without a valid one.

    Decoding happens in the worker thread that runs the call (the interceptor itself
    may run elsewhere), and the identity is put into a context variable for the
    servicer.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        cred = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == METADATA_KEY:
                cred = value if isinstance(value, str) else value.decode("ascii", "replace")
        auth = self._auth
        streaming = handler.response_streaming

        def wrap_fn(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def authenticated(request: Any, context: grpc.ServicerContext) -> Any:
                if not cred:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  f"no MUNGE credential in '{METADATA_KEY}' metadata")
                try:
                    ident, payload = auth.decode(cred)
                except AuthError as e:
                    log.warning("SECURITY: %s: rejected credential from %s: %s",
                                method, context.peer(), e)
                    code = (grpc.StatusCode.UNAVAILABLE if e.unavailable
                            else grpc.StatusCode.UNAUTHENTICATED)
                    context.abort(code, str(e))
                if payload != method.encode():
                    log.warning("SECURITY: %s: credential of uid %d was minted for %r",
                                method, ident.uid, payload[:80])
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  "MUNGE credential was not minted for this method")
                token = _identity.set(ident)
                try:
                    result = behaviour(request, context)
                finally:
                    _identity.reset(token)
                if streaming:
                    # A generator's body runs later, while grpc iterates it.
                    return _with_identity(ident, result)
                return result
            return authenticated

        return wrap_handler(handler, wrap_fn)


def _with_identity(ident: Identity, results: Any) -> Any:
    """Iterate a streaming handler's responses with the caller's identity set."""
    iterator = iter(results)
    while True:
        token = _identity.set(ident)
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            _identity.reset(token)
        yield item


class CredentialPlugin(_UUClient, _USClient, _SUClient, _SSClient):
    """Client side: adds a fresh credential, bound to the method, to every call."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or ())
        metadata.append((METADATA_KEY, self._auth.encode(details.method.encode())))
        return _CallDetails(details.method, details.timeout, metadata,
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iter: Any) -> Any:
        return continuation(self._details(details), request_iter)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iter: Any) -> Any:
        return continuation(self._details(details), request_iter)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any
