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

# `make gpu-check`: the CUDA tests (pytest -m cuda) and the benchmarks' GPU section, on a machine
# whose Python (GPU_PY: .venv's after `make setup`, else python3) has a CUDA build of torch,
# pytest, hypothesis, numpy and safetensors; under 5 minutes. Without a GPU both skip and say
# why. Our other dependencies are installed from $(GPU_WHEELS) when it holds wheels, so the GPU
# machine needs no network: run `make gpu-wheels` where the registry is reachable and bring the
# folder along.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS ?= gpu-wheels
GPU_SITE ?= /tmp/keisei-fn-gpu-site
GPU_NEEDS ?= orjson blake3  # what keisei_fn imports beyond the GPU machine's packages

.PHONY: gpu-wheels gpu-check

gpu-wheels:
	$(GPU_PY) -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--dest $(GPU_WHEELS) $(GPU_NEEDS)

gpu-check:
	@if ! $(GPU_PY) -c "import orjson, blake3" 2>/dev/null; then \
		echo "installing $(GPU_WHEELS)/*.whl into $(GPU_SITE)"; \
		ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1 || { echo "no wheels: make gpu-wheels"; exit 1; }; \
		$(GPU_PY) -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
			--target $(GPU_SITE) $(GPU_WHEELS)/*.whl || exit 1; \
	fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PY) -m pytest -p no:cacheprovider -m cuda -rs \
		tests/test_cuda.py
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PY) -m benchmarks.gpu --quick \
		--out benchmarks/results/gpu.json
