"""node_agent.shellwire: data frames by hand, byte for byte the protobuf encoding."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from node_agent import shellwire
from node_agent.proto.v1 import agent_pb2 as pb

SIZES = [0, 1, 127, 128, 16383, 16384, 300_000, (1 << 20) + 3]


@pytest.mark.parametrize("size", SIZES)
def test_data_frame_is_the_protobuf_encoding(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    parts = [payload[: size // 3], payload[size // 3:]]
    raw = shellwire.data_frame(parts)
    assert raw == pb.ShellFrame(data=payload).SerializeToString()
    assert pb.ShellFrame.FromString(raw).data == payload


@pytest.mark.parametrize("size", SIZES)
def test_parse_gives_data_frames_as_a_view_of_the_payload(size: int) -> None:
    payload = bytes(i % 253 for i in range(size))
    frame = shellwire.parse(pb.ShellFrame(data=payload).SerializeToString())
    assert isinstance(frame, memoryview)
    assert frame == payload


def test_parse_gives_other_frames_as_messages() -> None:
    for msg in (pb.ShellFrame(eof=True),
                pb.ShellFrame(data=b"last", eof=True),  # data and more: not the short cut
                pb.ShellFrame(open=pb.ShellOpen(job_id="42", public_key="ssh-ed25519 A")),
                pb.ShellFrame(opened=pb.ShellOpened(host_key="k", node="n", user="u"))):
        frame = shellwire.parse(msg.SerializeToString())
        assert isinstance(frame, pb.ShellFrame)
        assert frame == msg


def test_serialize_passes_encoded_frames_and_encodes_messages() -> None:
    raw = shellwire.data_frame([b"abc"])
    assert shellwire.serialize(raw) is raw
    assert shellwire.serialize(pb.ShellFrame(eof=True)) == pb.ShellFrame(
        eof=True).SerializeToString()


@pytest.mark.parametrize("raw", [
    b"\x1a\x05abc",                # data shorter than its length
    b"\x1a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varint that never ends
    b"\x0a\x03\xff\xff\xff",       # `open` that is not a message
])
def test_malformed_frames_raise_like_protobuf(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        shellwire.parse(raw)
