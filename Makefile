# Set-up is part of each target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.filterx-installed

.PHONY: demo test test-all bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dali,test]"
	touch $(STAMP)

demo: $(STAMP)  ## the whole chain on built-in sample data
	$(VENV)/bin/filterx demo

test: $(STAMP)  ## the test suite CI runs (slow tests excluded)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## including tests marked slow
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP)  ## the benchmark suites (quick mode); results go to bench/results/
	$(PY) -m bench --quick
