# callerid-adopt: the two commands a newcomer needs are `make demo` and `make test`
# (both as root on a fresh Debian 12 machine; both install what they need).

PY      ?= /usr/bin/python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
LAB     := $(PY) deploy/lab/lab.py

.PHONY: all deps venv proto lint typecheck unit integration test demo lab-up lab-down clean bench bench-all

all: venv

deps:
	bash deploy/install-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# The dev venv also imports the lab package (`lab`, in deploy/lab) and the checkout's
# `tests` package, so the benchmarks run as plain scripts (`.venv/bin/python
# tests/benchmarks/bench_logins.py`): one .pth file in its site-packages names both dirs.
# pytest needs none of it: pyproject's pythonpath gives it the lab.
$(VENV)/.dev-paths: $(VENV)/.installed
	$(VPY) -c 'import sys, sysconfig; open(sysconfig.get_path("purelib") + "/callerid-adopt-dev.pth", "w").write("".join(p + "\n" for p in sys.argv[1:]))' "$(CURDIR)" "$(CURDIR)/deploy/lab"
	touch $@

venv: $(VENV)/.installed $(VENV)/.dev-paths

# Regenerate the checked-in gRPC stubs (tests/unit/test_proto_stubs.py fails when they are stale).
proto: venv
	$(VPY) proto/generate.py

lint: venv
	$(VENV)/bin/ruff check callerid node_agent pam tests deploy proto

# mypy --strict over what pyproject.toml's [tool.mypy] files lists: the packages, the lab, the tests.
typecheck: venv
	$(VENV)/bin/mypy

# Unit tests. Those marked `root` run only as root; as another user they are left out and
# counted in the summary (with CI set, that is an error: CI runs as root).
unit: venv
	$(VPY) tests/run_pytest.py tests/unit

integration: deps venv
	$(VPY) tests/run_pytest.py tests/integration

# The test command (.ci/run calls exactly this), as root: installs everything, then lint,
# type check, unit tests (root-only ones too) and the lab integration tests.
test: deps venv
	$(MAKE) lint typecheck
	$(VPY) tests/run_pytest.py tests/unit tests/integration

# The demo: brings up a multi-node lab, shows jobs and the caller-ID chain across nodes, tears down.
demo: deps venv
	$(PY) deploy/lab/demo.py --venv $(abspath $(VENV))

lab-up: deps venv
	$(LAB) up --venv $(abspath $(VENV))

lab-down:
	$(LAB) down

bench: deps venv
	$(VPY) tests/benchmarks/bench_callerid.py

# All the benchmarks, one after the other (about 10 minutes).
bench-all: bench
	$(VPY) tests/benchmarks/bench_logins.py --rounds 100
	$(VPY) tests/benchmarks/bench_ssh_to_job.py
	$(VPY) tests/benchmarks/bench_auth.py
	$(VPY) tests/benchmarks/bench_starvation.py
	$(VPY) tests/benchmarks/bench_slurm_logins.py --rounds 40
	$(VPY) tests/benchmarks/bench_slurm_ssh_to_job.py --rounds 40

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
