"""Regenerate the checked-in gRPC stubs from proto/**/*.proto.

The .proto files mirror the Python package of the generated code:
proto/node_agent/proto/v1/agent.proto -> node_agent/proto/v1/agent_pb2.py,
agent_pb2_grpc.py and agent_pb2.pyi (+ agent_pb2_grpc.pyi from mypy-protobuf).

    python proto/generate.py            # write the stubs into the source tree
    python proto/generate.py --out DIR  # write them under DIR (the staleness test)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO = PROTO_ROOT.parent


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc (grpcio-tools) on every .proto; return the files written."""
    from grpc_tools import protoc  # dev dependency, pinned in pyproject.toml

    include = Path(protoc.__file__).parent / "_proto"
    protoc_gen_mypy = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    protoc_gen_mypy_grpc = shutil.which(
        "protoc-gen-mypy_grpc", path=str(Path(sys.executable).parent)
    )
    if not protoc_gen_mypy or not protoc_gen_mypy_grpc:
        raise SystemExit(
            "generate.py: mypy-protobuf's plugins are missing (pip install -e '.[dev]')")
    out.mkdir(parents=True, exist_ok=True)
    rel = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={protoc_gen_mypy}",
        f"--plugin=protoc-gen-mypy_grpc={protoc_gen_mypy_grpc}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *rel,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"generate.py: protoc failed with status {rc}")
    written = []
    for proto in proto_files():
        stem = out / proto.relative_to(PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            written.append(stem.with_name(stem.name + suffix))
    # Generated packages need an __init__.py at every level below the root package.
    for proto in proto_files():
        pkg = out / proto.relative_to(PROTO_ROOT).parent
        while pkg != out and pkg.parent != out:
            init = pkg / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated gRPC stubs (proto/generate.py)."""\n')
            pkg = pkg.parent
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO,
                        help="output root (default: the repository)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
