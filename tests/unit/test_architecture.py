"""The package's import directions, read from the source (AST), so that the map drawn in
node_agent/__init__.py stays true:

- `callerid` (the pure library) imports nothing of `node_agent`;
- `node_agent.jobs` (backends) imports neither the daemon (`node_agent.agent`) nor the
  CLIs (`node_agent.cli`);
- the shared modules at the top of `node_agent` import none of agent, cli and jobs;
- the CLIs never import the daemon, except the `node-agent` entry point (cli/daemon.py);
- only node_agent.dial makes gRPC channels (a broker will plug in there).
Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in a file; `from a import b` gives a.b as well as a,
    so that `from node_agent import agent` is seen as importing node_agent.agent."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(root: Path) -> list[str]:
    """Every import that breaks a rule, as 'file:line: module imports X (rule)'."""
    out: list[str] = []
    for path in sorted(root.glob("callerid/**/*.py")) + sorted(root.glob("node_agent/**/*.py")):
        if "proto" in path.relative_to(root).parts:
            continue
        me = module_name(root, path)
        shared = path.parent == root / "node_agent" and path.name != "__init__.py"
        seen: set[int] = set()
        for line, name in imports(path):
            rule = None
            if _under(me, "callerid") and _under(name, "node_agent"):
                rule = "the library imports nothing of node_agent"
            elif _under(me, "node_agent.jobs") and (
                    _under(name, "node_agent.agent") or _under(name, "node_agent.cli")):
                rule = "backends import neither the daemon nor the CLIs"
            elif _under(me, "node_agent.cli") and _under(name, "node_agent.agent") \
                    and me != "node_agent.cli.daemon":
                rule = "only the node-agent entry point imports the daemon"
            elif shared and any(
                    _under(name, f"node_agent.{p}") for p in ("agent", "cli", "jobs")):
                rule = "shared modules import neither the daemon, the CLIs nor the backends"
            elif name in ("grpc.insecure_channel", "grpc.secure_channel") \
                    and me != "node_agent.dial":
                rule = "only node_agent.dial makes channels"
            if rule and line not in seen:   # one finding per import statement
                seen.add(line)
                out.append(f"{path.relative_to(root)}:{line}: {me} imports {name} ({rule})")
    return out


def test_the_tree_keeps_the_import_rules() -> None:
    assert violations(REPO) == []


def test_channels_are_made_only_in_dial() -> None:
    """`grpc.insecure_channel(` written anywhere but dial.py (an attribute call, which
    the import walk does not see)."""
    offenders = [str(p.relative_to(REPO)) for p in REPO.glob("node_agent/**/*.py")
                 if "proto" not in p.parts and p.name != "dial.py"
                 and "insecure_channel(" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize(("module", "source", "rule"), [
    ("callerid/_x.py", "import node_agent.config", "imports nothing of node_agent"),
    ("node_agent/jobs/x.py", "from node_agent.agent import metrics", "neither the daemon"),
    ("node_agent/jobs/x.py", "def f():\n    from node_agent.cli import common\n",
     "neither the daemon"),
    ("node_agent/cli/adoptctl.py", "from node_agent import agent", "only the node-agent"),
    ("node_agent/config.py", "from node_agent.jobs import native", "shared modules"),
    ("node_agent/client.py", "from grpc import insecure_channel", "only node_agent.dial"),
])
def test_a_forbidden_import_is_found(tmp_path: Path, module: str, source: str,
                                     rule: str) -> None:
    """The checker itself: each rule catches a file that breaks it."""
    for pkg in ("callerid", "node_agent", "node_agent/jobs", "node_agent/cli"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
    (tmp_path / module).write_text(source)
    (found,) = violations(tmp_path)
    assert rule in found and module in found


def test_the_node_agent_entry_point_may_import_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "node_agent/cli").mkdir(parents=True)
    (tmp_path / "node_agent/cli/daemon.py").write_text("from node_agent.agent import server\n")
    assert violations(tmp_path) == []
