"""The checked-in gRPC stubs must be what proto/generate.py makes from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert generated, "generate.py produced nothing"
    stale = [str(rel) for rel in generated
             if not (REPO / rel).exists()
             or (REPO / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"stale stubs (run `make proto`): {stale}"


def test_every_proto_has_checked_in_stubs() -> None:
    for proto in (REPO / "proto").rglob("*.proto"):
        stem = REPO / proto.relative_to(REPO / "proto").with_suffix("")
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            assert stem.with_name(stem.name + suffix).exists(), f"{proto} has no {suffix}"


def test_every_checked_in_stub_has_its_proto() -> None:
    # A .proto removed (admission.proto, when the PAM wire format left protobuf) takes
    # its stubs with it.
    for stub in (REPO / "node_agent" / "proto").rglob("*_pb2*.py*"):
        if stub.suffix not in (".py", ".pyi") or "__pycache__" in stub.parts:
            continue  # bytecode: not checked in
        stem = stub.name.split("_pb2")[0]
        proto = REPO / "proto" / stub.parent.relative_to(REPO) / f"{stem}.proto"
        assert proto.exists(), f"{stub} has no {proto}"
