"""The exception tree of :mod:`callerid`.

Everything the library raises on purpose derives from :class:`Error`, and each class also
derives from the builtin a caller would naturally catch, so ``except ValueError`` keeps
working for code that does not know this library (the httpx/attrs convention)::

    Exception
     +-- Error
          +-- KernelFormatError   (also ValueError)  a /proc or cgroupfs line we cannot parse
          +-- InvalidJobId        (also ValueError)  a job id that is unsafe as a path component
          +-- CgroupError         (also OSError)     a cgroupfs operation failed
          +-- NetlinkUnavailable                     NETLINK_SOCK_DIAG cannot be used here

Raw OS errors are converted where the library touches the kernel; a vanished process is
reported with the builtin :class:`ProcessLookupError` (as ``os.kill`` would) and a permission
problem with the builtin :class:`PermissionError`, so no wrapper is needed for those.
"""

from __future__ import annotations

import os

__all__ = [
    "CgroupError",
    "Error",
    "InvalidJobId",
    "KernelFormatError",
    "NetlinkUnavailable",
]

# Long hostile inputs (a 4 KiB job id, a corrupted kernel line) must not flood the logs.
_MAX_SHOWN = 80


def _shorten(text: str, limit: int = _MAX_SHOWN) -> str:
    """Return *text* cut to *limit* characters, marking the cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"...(+{len(text) - limit} chars)"


class Error(Exception):
    """Base class of every exception the library raises on purpose."""


class KernelFormatError(Error, ValueError):
    """A line of a kernel-generated file (``/proc/net/tcp``, ``/proc/<pid>/cgroup``, ...)
    did not have the expected format.

    This means the kernel speaks a dialect we do not know (or the "file" is not what we
    think it is), never a normal race, so it is raised rather than skipped.

    Attributes: ``path`` (the file), ``lineno`` (1-based), ``line`` (the text, without the
    newline) and ``reason`` (what was wrong, may be empty).
    """

    def __init__(self, path: str | os.PathLike[str], lineno: int, line: str, reason: str = ""):
        self.path = os.fspath(path)
        self.lineno = lineno
        self.line = line.rstrip("\n")
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return f"{self.path}, line {self.lineno}: malformed line {_shorten(self.line)!r}{why}"


class InvalidJobId(Error, ValueError):
    """A job id that is not acceptable.

    Job ids become path components (``<cgroup>/<subtree>/job_<id>``) and appear in logs, so
    only a small, safe alphabet is allowed. ``job_id`` holds the offending value, cut to a
    printable length; the message says which rule it broke.
    """

    def __init__(self, job_id: object, rule: str):
        text = job_id if isinstance(job_id, str) else repr(job_id)
        self.job_id = _shorten(text)
        self.rule = rule
        super().__init__(f"invalid job id {self.job_id!r}: {rule}")


class CgroupError(Error, OSError):
    """A cgroup operation failed.

    Attributes: ``path`` (the cgroupfs file or directory involved, or None), ``errno`` and
    ``strerror`` when it wraps an :class:`OSError` (else None).
    """

    def __init__(
        self,
        message: str,
        path: str | os.PathLike[str] | None = None,
        *,
        cause: OSError | None = None,
    ):
        if cause is not None and cause.errno is not None:
            super().__init__(cause.errno, cause.strerror)
        else:
            super().__init__(message)
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        if cause is not None:
            self.__cause__ = cause

    def __str__(self) -> str:
        return self.message


class NetlinkUnavailable(Error):
    """``NETLINK_SOCK_DIAG`` cannot be used (no netlink in this kernel or sandbox,
    ``EPROTONOSUPPORT``, ``EPERM``, ...). Callers fall back to the ``/proc`` path."""
