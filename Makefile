# The two commands of README.md: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel for these machines; pyproject.toml keeps the range loose.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/keisei-fn demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# pytest-xdist: one worker per core, each test file on one worker (module fixtures such as a
# torchrun job or the demo run start once). `make test PYTEST_WORKERS=0` runs the tests in one
# process, as plain `pytest` does.
PYTEST_WORKERS ?= auto

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

bench: setup  # python -m benchmarks --help for options (--quick, --sections, --repeat)
	$(PY) -m benchmarks
