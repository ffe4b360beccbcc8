# Two entry points: `make demo` (set up, protect the bundled CNN, show accuracies)
# and `make test` (set up, run the whole test suite). Both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip --disable-pip-version-check -q

.PHONY: demo test venv

venv:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)

demo: venv
	$(PIP) install .
	$(VENV)/bin/oppass demo

test: venv
	$(PIP) install '.[test]'
	$(VENV)/bin/pytest
