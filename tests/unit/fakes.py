"""Fakes for unit tests of node_agent (never used outside tests/)."""

from __future__ import annotations

import base64
import itertools
import threading

from node_agent.auth import Identity
from node_agent.errors import AuthError


class FakeAuthenticator:
    """A MUNGE stand-in: the credential names the uid in clear, decoding twice fails
    like munged's replay check, and a credential restricted to a uid decodes only for an
    authenticator of that uid (MUNGE_OPT_UID_RESTRICTION). `as_uid` makes the
    authenticator of a process of that uid, sharing one "munged"."""

    def __init__(self, uid: int = 0, gid: int = 0) -> None:
        self.uid = uid
        self.gid = gid
        self._seen: set[str] = set()
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def as_uid(self, uid: int, gid: int | None = None) -> FakeAuthenticator:
        other = FakeAuthenticator(uid, uid if gid is None else gid)
        other._seen = self._seen  # one "munged" for everybody
        other._counter = self._counter
        other._lock = self._lock
        return other

    def encode(self, payload: bytes, *, restrict_uid: int | None = None,
               ttl: int | None = None) -> str:
        with self._lock:
            n = next(self._counter)
        only = "" if restrict_uid is None else str(restrict_uid)
        return f"FAKE:{self.uid}:{self.gid}:{n}:{only}:{base64.b64encode(payload).decode()}"

    def decode(self, credential: str) -> tuple[Identity, bytes]:
        try:
            tag, uid, gid, _n, only, payload = credential.split(":")
            assert tag == "FAKE"
            ident = Identity(int(uid), int(gid))
            data = base64.b64decode(payload)
            restricted = int(only) if only else None
        except (ValueError, AssertionError):
            raise AuthError("MUNGE decode failed: Invalid credential format") from None
        if restricted is not None and restricted != self.uid:
            raise AuthError("MUNGE decode failed: Unauthorized credential decode")
        with self._lock:
            if credential in self._seen:
                raise AuthError("MUNGE decode failed: Replayed credential", replayed=True)
            self._seen.add(credential)
        return ident, data
