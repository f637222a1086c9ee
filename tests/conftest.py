"""What every test run shares: the ``root`` marker (registered in pyproject.toml, where
``--strict-markers`` makes a misspelt marker an error instead of a silent no-op).

``@pytest.mark.root`` means one thing: the test needs euid 0 (to chown, setuid, connect
to a root-only socket, build the lab, ...). A test that needs root must carry it rather
than skip itself on ``os.geteuid()``, so that no run leaves one out without saying so:

- as root (``make test``, and CI, which runs as root) every test runs;
- as another user the root tests are deselected, and the run ends with one line saying
  how many were left out and why;
- as another user with ``CI`` set the run stops before any test: a CI job that is not
  root would otherwise pass without them.
"""

from __future__ import annotations

import os

import pytest

NOT_RUN = pytest.StashKey[int]()


def in_ci() -> bool:
    """``CI`` set to anything but an empty or false value (CI systems set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(trylast=True)  # after the other hooks have marked or filtered the items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    root_only = [item for item in items if item.get_closest_marker("root") is not None]
    if not root_only:
        return
    if in_ci():
        raise pytest.UsageError(
            f"{len(root_only)} of the tests collected need root and CI runs as root, but this "
            f"run is uid {os.geteuid()}: run it as root (CI={os.environ['CI']!r})")
    config.hook.pytest_deselected(items=root_only)
    items[:] = [item for item in items if item.get_closest_marker("root") is None]
    config.stash[NOT_RUN] = len(root_only)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    not_run = config.stash.get(NOT_RUN, 0)
    if not_run:
        terminalreporter.write_sep(
            "=", f"{not_run} root-only tests not run: they need root "
                 f"(marker `root`; run `sudo make test`, as CI does)", yellow=True)
