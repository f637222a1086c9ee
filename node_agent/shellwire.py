"""The OpenJobShell stream on the wire: protobuf `ShellFrame`s, data frames by hand.

Every byte of an ssh-to-job session passes through two Python relays (client and agent),
and protobuf copies a `bytes` field on every step: building the message, serializing it,
parsing it, and each time the field is read. A bulk copy is CPU-bound on those copies.
So both relays register these (de)serializers for OpenJobShell instead of the generated
ones. The bytes on the wire are exactly the protobuf encoding of `ShellFrame` (any other
client or server made from agent.proto interoperates); only data frames take a short cut:

- `data_frame(parts)` encodes `ShellFrame{data: b"".join(parts)}` with one copy;
- `parse(raw)` returns a data-only frame as a zero-copy `memoryview` of its payload, and
  anything else (open, opened, eof, a data frame with more fields) as a `pb.ShellFrame`.

`validate_shells` is the rule for `ShellOpen.shells`, checked by the client before it
asks and by the agent before it uses them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from node_agent.errors import InvalidRequest
from node_agent.proto.v1 import agent_pb2 as pb

METHOD = f"/{pb.DESCRIPTOR.services_by_name['NodeAgent'].full_name}/OpenJobShell"

# ShellFrame.data is field 3, wire type 2 (length-delimited).
_DATA_TAG = bytes(((pb.ShellFrame.DATA_FIELD_NUMBER << 3) | 2,))
_MAX_VARINT = 10

Frame = pb.ShellFrame | memoryview

MAX_SHELLS = 16
MAX_SHELL_PATH = 256
_PLAIN_ABSOLUTE = re.compile(r"(/[A-Za-z0-9_.+-]+)+")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def data_frame(parts: Sequence[bytes]) -> bytes:
    """The encoded `ShellFrame{data: b"".join(parts)}`."""
    size = sum(len(p) for p in parts)
    return b"".join([_DATA_TAG, _varint(size), *parts])


def serialize(frame: pb.ShellFrame | bytes) -> bytes:
    """The request/response serializer: frames from `data_frame` are already encoded."""
    if isinstance(frame, bytes):
        return frame
    return frame.SerializeToString()


def unpack(frame: Frame) -> tuple[bytes | memoryview, bool]:
    """What a relay needs of a parsed frame: its data (maybe empty), and whether it ends
    its direction of the stream (eof)."""
    if isinstance(frame, memoryview):
        return frame, False
    return frame.data, frame.eof


def parse(raw: bytes) -> Frame:
    """The request/response deserializer: a data-only frame's payload, else the message.
    Malformed bytes raise protobuf's DecodeError, as the generated parser would."""
    if raw[:1] == _DATA_TAG:
        size, shift, i = 0, 0, 1
        while i < min(len(raw), 1 + _MAX_VARINT):
            b = raw[i]
            size |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                if i + size == len(raw):
                    return memoryview(raw)[i:]
                break
            shift += 7
    return pb.ShellFrame.FromString(raw)


def validate_shells(shells: Sequence[str]) -> list[str]:
    """The client's shells, if each is an absolute path of plain names (what the setup
    script can hold unquoted and test as is), at most MAX_SHELL_PATH long, MAX_SHELLS in
    all; else InvalidRequest. Nothing is looked up here: session-setup picks one, as the
    user, in the job's view."""
    if len(shells) > MAX_SHELLS:
        raise InvalidRequest(f"shells: at most {MAX_SHELLS} may be given, not {len(shells)}")
    for sh in shells:
        if not isinstance(sh, str) or len(sh) > MAX_SHELL_PATH or \
                not _PLAIN_ABSOLUTE.fullmatch(sh) or \
                any(part in (".", "..") for part in sh.split("/")):
            raise InvalidRequest(
                f"shells: {str(sh)[:80]!r} is not an absolute path of plain names "
                f"(A-Z a-z 0-9 _ . + - between slashes, no . or .., at most "
                f"{MAX_SHELL_PATH} characters)")
    return list(shells)
