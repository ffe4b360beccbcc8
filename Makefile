# Two entry points: `make demo` (set up, protect the bundled CNN, show accuracies)
# and `make test` (set up, run the whole test suite). Both work on a fresh machine, as do
# `make lint` (set up, run ruff and mypy) and `make bench` (set up, run every benchmark of
# docs/PERFORMANCE.md; JSON in bench.json).
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip --disable-pip-version-check -q

.PHONY: bench demo lint test venv

venv:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)

demo: venv
	$(PIP) install '.[campaign]'
	$(VENV)/bin/oppass demo

lint: venv
	$(PIP) install '.[test]'
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: venv
	$(PIP) install '.[test]'
	$(VENV)/bin/pytest

bench: venv
	$(PIP) install '.[test,bench]'
	$(VENV)/bin/python tools/bench --json bench.json
