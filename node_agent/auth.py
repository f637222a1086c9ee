"""Identity on every gRPC call, both ways: MUNGE credentials and the interceptors.

A credential means one thing, at one place, once:

- Every call to an agent carries a MUNGE credential in the `x-munge-cred` metadata entry.
  Its payload is a `Claim`: the protocol version, the full method name, the node it is
  meant for (`node:<name>` over the local Unix socket, `ip:<address>` as dialed over TCP)
  and the SHA-256 of the request (a unary call's request message, or a stream's first
  message, serialized deterministically). An agent refuses a claim for another method,
  another node or another request; munged refuses a credential decoded twice.
- Request credentials are restricted to uid 0 (MUNGE_OPT_UID_RESTRICTION): only root,
  that is the agent, can decode one. A process that captures a credential (a squatter on
  the agent's port while the agent is down) can neither read it nor use it anywhere else.
- The agent answers every authenticated call with a credential of its own
  (`x-munge-reply`, in the initial metadata of a stream, the trailing metadata of a single
  answer): made by root, restricted to the caller's uid, its payload bound to the
  caller's credential. The client checks it before it trusts an answer, so a
  process that is not root on the node it meant (a port squatter) is refused with one
  clear line (`ImpostorError`).

`Authenticator` is the interface; `MungeAuthenticator` talks to munged through libmunge
with ctypes (about 0.1 ms an encode or a decode; the `munge` CLI costs ~2.5 ms). Unit
tests inject a fake authenticator. The health and reflection services are exempt so that
standard gRPC tools work; they reveal nothing about jobs.
"""

from __future__ import annotations

import contextvars
import ctypes
import ctypes.util
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Container, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from callerid import local_addresses, normalize_ip
from node_agent.errors import AuthError, ImpostorError

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
REPLY_KEY = "x-munge-reply"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
PROTOCOL = "callerid-adopt/1"
ROOT = 0
# A request credential is decoded when its call starts, and calls start at once (every
# call has a deadline, ssh-to-job's open waits at most 30 s): a minute covers that and
# any sane clock skew between nodes, and bounds how long a captured one could be replayed
# at the node it names (munged's default is 5 minutes).
REQUEST_TTL = 60

log = logging.getLogger("node_agent.auth")
security = logging.getLogger("node_agent.security")


@dataclass(frozen=True)
class Identity:
    """Who is calling, as vouched for by the authenticator."""

    uid: int
    gid: int


class Authenticator(Protocol):
    """Mints credentials (client side) and verifies them (server side)."""

    def encode(self, payload: bytes, *, restrict_uid: int | None = None,
               ttl: int | None = None) -> str:
        """A credential for `payload`; with `restrict_uid`, only that uid may decode it;
        with `ttl`, it expires that many seconds after it was made (else munged's TTL)."""
        ...

    def decode(self, credential: str) -> tuple[Identity, bytes]:
        """Return the identity and payload, or raise AuthError."""
        ...


def digest(message: Any) -> str:
    """SHA-256 (hex) of a request as a credential binds it: a protobuf message serialized
    deterministically (map entries sorted), or raw bytes as they are."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        data = bytes(message)
    else:
        data = message.SerializeToString(deterministic=True)
    return hashlib.sha256(data).hexdigest()


def target_claim(target: str, local_node: str) -> str:
    """The node a client means by a gRPC target: `node:<local_node>` for `unix:` (the
    agent of this node), `ip:<address>` for an `ipv4:`/`ipv6:` target or an IP literal."""
    if target.startswith("unix:"):
        return f"node:{local_node}"
    text = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target
    if text.startswith("["):
        host = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        host = text.partition(":")[0]
    else:
        host = text
    return f"ip:{normalize_ip(host)}"


@dataclass(frozen=True)
class Claim:
    """What a request credential authorizes: one method, at one node, for one request.

    >>> Claim("/callerid_adopt.v1.NodeAgent/CallerId", "ip:10.77.0.11", "ab12").payload()
    b'callerid-adopt/1 /callerid_adopt.v1.NodeAgent/CallerId ip:10.77.0.11 ab12'
    """

    method: str
    target: str
    body: str

    def payload(self) -> bytes:
        """The credential's payload: protocol, method, target and request digest."""
        return f"{PROTOCOL} {self.method} {self.target} {self.body}".encode()

    @classmethod
    def parse(cls, payload: bytes) -> Claim:
        """The claim in a payload; AuthError when it is not one of ours."""
        try:
            version, method, target, body = payload.decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise AuthError("MUNGE credential was not minted by callerid-adopt "
                            f"({PROTOCOL})") from None
        if version != PROTOCOL:
            raise AuthError(f"MUNGE credential is for protocol {version!r}, not {PROTOCOL}")
        return cls(method, target, body)


def request_credential(authenticator: Authenticator, method: str, claim_target: str,
                       body: str) -> str:
    """A request credential as every client mints it: a Claim (`body` is `digest()` of
    the request, or of a stream's first message), for root's eyes only, short-lived."""
    return authenticator.encode(Claim(method, claim_target, body).payload(),
                                restrict_uid=ROOT, ttl=REQUEST_TTL)


def reply_payload(method: str, request_credential: str) -> bytes:
    """What the agent's answer credential says: this method, for exactly this request
    credential (its SHA-256), so it proves nothing about any other call."""
    cred = hashlib.sha256(request_credential.encode("ascii", "replace")).hexdigest()
    return f"{PROTOCOL}-reply {method} {cred}".encode()


# munge.h: enum munge_opt
_MUNGE_OPT_TTL = 4
_MUNGE_OPT_SOCKET = 8
_MUNGE_OPT_UID_RESTRICTION = 9
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
        # The same function for options whose value is an int (uid_t): indexing a CDLL
        # makes a new function object, so the two prototypes do not clash.
        self._ctx_set_int = lib["munge_ctx_set"]
        self._ctx_set_int.restype = ctypes.c_int
        self._ctx_set_int.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
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

    def encode(self, payload: bytes, *, restrict_uid: int | None = None,
               ttl: int | None = None) -> str:
        """A credential for `payload`, restricted to `uid` when given."""
        ctx = self._ctx()
        try:
            for opt, value in ((_MUNGE_OPT_UID_RESTRICTION, restrict_uid), (_MUNGE_OPT_TTL, ttl)):
                if value is not None:
                    rc = self._ctx_set_int(ctx, opt, value)
                    if rc != 0:
                        raise self._error(rc, ctx, "encode (options)")
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
        """Who made the credential and its payload; AuthError when munged refuses it."""
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


class NodeTargets:
    """Which claimed targets mean this node: `node:<name>`, and `ip:<address>` for each
    address of the agent's network namespace. The addresses are read once and again when a
    claim names an unknown one (an address added since), at most once a second, so a
    stream of claims for other nodes cannot make the agent dump its addresses in a loop."""

    def __init__(self, node: str, addresses: Collection[str] | None = None,
                 refresh_interval: float = 1.0) -> None:
        self.node = node
        self._fixed = addresses is not None
        self._addresses = frozenset(str(normalize_ip(a)) for a in addresses or ())
        self._interval = refresh_interval
        self._read_at = -refresh_interval
        self._lock = threading.Lock()
        if not self._fixed:
            self._refresh()

    def _refresh(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._read_at < self._interval:
                return
            self._read_at = now
        try:
            found = frozenset(str(a) for a in local_addresses())
        except OSError as e:  # NetlinkUnavailable is an OSError too; keep what we had
            log.warning("cannot read this node's addresses: %s", e)
            return
        self._addresses = found

    def __contains__(self, target: object) -> bool:
        if not isinstance(target, str):
            return False
        kind, _, value = target.partition(":")
        if kind == "node":
            return value == self.node
        if kind != "ip":
            return False
        try:
            ip = str(normalize_ip(value))
        except ValueError:
            return False
        if ip in self._addresses:
            return True
        if not self._fixed:
            self._refresh()
        return ip in self._addresses


class AuthInterceptor(ServerInterceptor):
    """Decodes the MUNGE credential of every call; refuses calls without a valid one, or
    whose claim names another method, another node or another request; and answers each
    authenticated call with the agent's own credential (see the module docstring).

    Decoding happens in the worker thread that runs the call (the interceptor itself
    may run elsewhere), and the identity is put into a context variable for the
    servicer. A stream's claim is checked against its first message when the servicer
    reads it, before the servicer can act on it.
    """

    def __init__(self, authenticator: Authenticator, targets: Container[str]) -> None:
        self._auth = authenticator
        self._targets = targets

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        """The handler, wrapped to verify the caller's credential first."""
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        cred = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == METADATA_KEY:
                cred = value if isinstance(value, str) else value.decode("ascii", "replace")
        auth = self._auth
        targets = self._targets
        streaming = handler.response_streaming
        request_streaming = handler.request_streaming

        def refuse(context: grpc.ServicerContext, uid: int | None, why: str,
                   public: str) -> None:
            security.warning("SECURITY: %s: refused the credential of %s from %s: %s",
                             method, "an unknown caller" if uid is None else f"uid {uid}",
                             context.peer(), why)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, public)

        def wrap_fn(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def authenticated(request: Any, context: grpc.ServicerContext) -> Any:
                if not cred:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  f"no MUNGE credential in '{METADATA_KEY}' metadata")
                try:
                    ident, payload = auth.decode(cred)
                except AuthError as e:
                    if e.unavailable:
                        log.error("%s: %s", method, e)
                        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
                    refuse(context, None, str(e), str(e))
                try:
                    claim = Claim.parse(payload)
                except AuthError as e:
                    refuse(context, ident.uid, f"{e} (payload {payload[:80]!r})", str(e))
                if claim.method != method:
                    refuse(context, ident.uid, f"it was minted for {claim.method[:80]!r}",
                           "MUNGE credential was not minted for this method")
                if claim.target not in targets:
                    refuse(context, ident.uid,
                           f"it was minted for {claim.target[:80]!r}, not for this node",
                           f"MUNGE credential was minted for {claim.target[:80]}, "
                           "not for this node")
                if request_streaming:
                    request = _first_checked(request, claim.body, method, ident, context)
                elif digest(request) != claim.body:
                    refuse(context, ident.uid, "it was minted for another request",
                           "MUNGE credential was not minted for this request")
                # Prove to the caller that root on this node answers (module docstring):
                # before a stream's first response; with a single answer, in its trailing
                # metadata, which goes out in the same batch as the answer (initial
                # metadata sent on its own costs every call one more trip through grpc).
                proof = ((REPLY_KEY, auth.encode(reply_payload(method, cred),
                                                 restrict_uid=ident.uid)),)
                if streaming:
                    context.send_initial_metadata(proof)
                else:
                    context.set_trailing_metadata(proof)
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


def _first_checked(requests: Iterator[Any], body: str, method: str, ident: Identity,
                   context: grpc.ServicerContext) -> Iterator[Any]:
    """The request stream, its first message checked against the claim before anyone
    sees it."""
    first = next(requests, None)
    if first is None:
        return
    if digest(first) != body:
        security.warning("SECURITY: %s: refused the credential of uid %d from %s: it was "
                         "minted for another first message", method, ident.uid, context.peer())
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "MUNGE credential was not minted for this request")
    yield first
    yield from requests


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


# -- the client side ---------------------------------------------------------------------

class CredentialPlugin(_UUClient, _USClient, _SUClient, _SSClient):
    """Client side: adds a fresh credential to every call, bound to the method, the node
    meant (`target_claim`) and the request (a stream's first message), decodable by root
    only; and refuses an answer that does not carry the agent's proof (`ImpostorError`)."""

    def __init__(self, authenticator: Authenticator, target: str, local_node: str) -> None:
        self._auth = authenticator
        self.target = target
        self._claim_target = target_claim(target, local_node)

    def _details(self, details: Any, body: str) -> tuple[Any, str]:
        cred = request_credential(self._auth, details.method, self._claim_target, body)
        metadata = [*(details.metadata or ()), (METADATA_KEY, cred)]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression), cred

    def verify(self, metadata: Any, method: str, cred: str) -> None:
        """Check the agent's answer credential; raise ImpostorError when it is missing,
        not root's, or not bound to our request credential `cred`."""
        reply = next((v for k, v in metadata or () if k == REPLY_KEY), None)
        where = f"the agent at {self.target} is not root on the node meant"
        if not reply:
            raise ImpostorError(f"{where}: its answer carries no credential; ignored")
        text = reply if isinstance(reply, str) else reply.decode("ascii", "replace")
        try:
            ident, payload = self._auth.decode(text)
        except AuthError as e:
            if e.unavailable:
                raise
            raise ImpostorError(f"{where}: its answer's credential is invalid ({e}); "
                                "ignored") from None
        if ident.uid != ROOT:
            raise ImpostorError(f"{where}: its answer was signed by uid {ident.uid}; ignored")
        if payload != reply_payload(method, cred):
            raise ImpostorError(f"{where}: its answer's credential was made for another "
                                "request; ignored")

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """Sign a single call and verify its answer."""
        new, cred = self._details(details, digest(request))
        return _VerifiedOutcome(continuation(new, request), self, details.method, cred)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """Sign a call with a streamed answer and verify the stream."""
        new, cred = self._details(details, digest(request))
        return _VerifiedStream(continuation(new, request), self, details.method, cred)

    def _first(self, details: Any, request_iter: Any) -> tuple[Any, str, Iterator[Any]]:
        # The claim binds the first message: take it now (callers yield it at once).
        requests = iter(request_iter)
        first = next(requests, None)
        new, cred = self._details(details, "" if first is None else digest(first))
        rest = requests if first is None else itertools.chain([first], requests)
        return new, cred, rest

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iter: Any) -> Any:
        """Sign a streaming call and verify its answer."""
        new, cred, requests = self._first(details, request_iter)
        return _VerifiedOutcome(continuation(new, requests), self, details.method, cred)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iter: Any) -> Any:
        """Sign a bidirectional stream and verify the agent's answer."""
        new, cred, requests = self._first(details, request_iter)
        return _VerifiedStream(continuation(new, requests), self, details.method, cred)


class _Verified:
    """A call whose answer is handed out only once the agent's credential (in the
    metadata `_proof_in` names) checked out: ImpostorError otherwise. Everything else is
    the call's."""

    _proof_in = "trailing_metadata"

    def __init__(self, call: Any, plugin: CredentialPlugin, method: str, cred: str) -> None:
        self._call = call
        self._plugin = plugin
        self._method = method
        self._cred = cred
        self._checked = False

    def _check(self) -> None:
        if not self._checked:
            metadata = getattr(self._call, self._proof_in)()
            self._plugin.verify(metadata, self._method, self._cred)
            self._checked = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _VerifiedOutcome(_Verified):
    """A single answer (the call, and its future: `.future()` calls stay asynchronous):
    `result()` raises the call's error as it is, or ImpostorError for an answer without
    the agent's proof (in its trailing metadata)."""

    def result(self, timeout: float | None = None) -> Any:
        response = self._call.result(timeout)   # raises the call's error, if any
        self._check()
        return response

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error: BaseException | None = self._call.exception(timeout)
        if error is None:
            try:
                self._check()
            except ImpostorError as e:
                return e
        return error

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._call.add_done_callback(lambda _done: fn(self))


class _VerifiedStream(_Verified):
    """A response stream whose first response is handed out only once the agent's proof
    (in its initial metadata) checked out."""

    _proof_in = "initial_metadata"

    def __iter__(self) -> _VerifiedStream:
        return self

    def __next__(self) -> Any:
        item = next(self._call)
        self._check()
        return item


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any
