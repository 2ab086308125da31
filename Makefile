# The two commands of the README, each installing what it needs first (scripts/install.sh: a .venv from a
# hashed lock; a second call with unchanged locks installs nothing). CPython 3.11, Linux x86_64.
#   make demo    the main job end to end on the embedded demo corpus -> runs/demo/report.md
#   make test    the full test suite, exactly what CI runs (system packages for the integration tests too)
# Also: make fast (the inner-loop lane, no servers), make lint, make lock (re-resolve the locks; needs PyPI).
.PHONY: demo test fast lint lock install install-dev
PYTEST_ARGS ?= --durations=15
# two test processes, each test module whole on one of them (its module-scoped servers start once): the
# integration tests mostly wait on servers and subprocesses, so 2 processes on 2 cores take ~0.6x the time
XDIST ?= -n 2 --dist loadfile

install:
	@bash scripts/install.sh runtime

install-dev:
	@bash scripts/ci-system-deps.sh
	@bash scripts/install.sh dev

demo: install
	.venv/bin/distilflow pipeline --output runs/demo

test: install-dev
	.venv/bin/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

fast:
	@bash scripts/install.sh dev
	.venv/bin/python -m pytest -q $(XDIST) -m "not integration and not slow and not gpu and not benchmark" $(PYTEST_ARGS)

lint:
	@bash scripts/install.sh dev
	.venv/bin/ruff check . && .venv/bin/mypy

lock:
	@bash scripts/install.sh dev
	bash scripts/lock.sh
