"""The job environment's names are defined once (node_agent/jobenv.py).

Code that sets them uses the constants; shell snippets, documentation and tests that
read them name them in text, and this test checks every such name against the
definition, so a misspelt or undefined `CALLERID_...` variable fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from node_agent import config, jobenv

REPO = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bCALLERID_[A-Z0-9_]+\b")
TEXT_SUFFIXES = {".py", ".pyi", ".md", ".example", ".toml", ".sh", ".service", ".proto"}
# callerid-adopt's variables that are not a job's, and what reads them.
NOT_A_JOBS = {
    config.ENV_VAR: "the CLIs: which configuration file",
    "CALLERID_IT_LAB": "the integration tests: the lab instance to run in",
    "CALLERID_LAB_DIR": "the lab: its state directory",
}


def repository_text() -> dict[Path, str]:
    files = {}
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if any(p.startswith(".") or p == "__pycache__" or p.endswith(".egg-info")
               for p in parts):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "Makefile"):
            files[path] = path.read_text(errors="replace")
    return files


def test_every_callerid_variable_named_anywhere_is_defined() -> None:
    seen: dict[str, set[str]] = {}
    for path, text in repository_text().items():
        for m in NAME.finditer(text):
            seen.setdefault(m.group(), set()).add(str(path.relative_to(REPO)))
    unknown = {name: sorted(where) for name, where in seen.items()
               if name not in jobenv.NAMES and name not in NOT_A_JOBS}
    assert not unknown, f"not in node_agent/jobenv.py: {unknown}"
    # The scan sees what it should: the job's variables are named outside jobenv.py too.
    assert seen[jobenv.JOB_ID] - {"node_agent/jobenv.py"}, seen[jobenv.JOB_ID]


def test_the_names_are_distinct_and_what_a_job_gets() -> None:
    assert len(set(jobenv.NAMES)) == len(jobenv.NAMES)
    assert all(NAME.fullmatch(name) for name in jobenv.NAMES)
    assert set(jobenv.of_job("42", "node2")) == {jobenv.JOB_ID, jobenv.NODE}
