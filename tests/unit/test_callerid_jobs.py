"""Job id validation (ids become cgroupfs path components) and the Job model."""

from __future__ import annotations

import pytest

from callerid import JOB_ID_MAX_LEN, InvalidJobId, Job, validate_job_id


@pytest.mark.parametrize(
    "job_id", ["42", "42_7", "42+1", "123.0", "a", "Z", "job-1.step_2", "9" * JOB_ID_MAX_LEN]
)
def test_valid_job_ids(job_id: str) -> None:
    assert validate_job_id(job_id) == job_id


@pytest.mark.parametrize(
    ("job_id", "rule"),
    [
        ("../x", "character '/'"),
        ("a/b", "character '/'"),
        ("/abs", "character '/'"),
        ("x" * 4096, "longer than 64"),
        ("9" * (JOB_ID_MAX_LEN + 1), "longer than 64"),
        ("a\x00b", r"character '\\x00'"),
        ("", "empty"),
        (".", "start with a letter or a digit"),
        ("..", "start with a letter or a digit"),
        ("a..b", r"'\.\.'"),
        (" x", "character ' '"),
        ("x ", "character ' '"),
        ("-rf", "start with a letter or a digit"),
        ("_1", "start with a letter or a digit"),
        ("a\nb", r"character '\\n'"),
        ("a;b", "character ';'"),
        ("a$b", r"character '\$'"),
        ("é", "character 'é'"),
        ("١٢", "character"),  # Arabic-Indic digits: isdigit() but not ASCII
    ],
)
def test_hostile_job_ids(job_id: str, rule: str) -> None:
    with pytest.raises(InvalidJobId, match=rule) as info:
        validate_job_id(job_id)
    assert isinstance(info.value, ValueError)
    assert len(info.value.job_id) < 120  # a 4 KiB id is cut in the attribute and message
    assert len(str(info.value)) < 250


def test_non_string_job_id() -> None:
    with pytest.raises(InvalidJobId, match="must be a str"):
        validate_job_id(42)  # type: ignore[arg-type]


def test_job_model_validates_its_id() -> None:
    job = Job("42", "alice", 1000, 1000, 1700000000.0, main_pid=4321)
    assert (job.id, job.user, job.uid, job.main_pid) == ("42", "alice", 1000, 4321)
    assert Job("43", "bob", 1001, 1001, 0.0).main_pid is None
    with pytest.raises(InvalidJobId):
        Job("../etc", "alice", 1000, 1000, 0.0)
    with pytest.raises(AttributeError):
        job.id = "43"  # type: ignore[misc]
