# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the demo
#   make test   runs the test suite (installing first if needed: the venv, and the Debian packages the
#               tests use -- chromium, chromium-driver, openssl, redis-server -- via tools/system_deps.sh)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install system-deps demo test clean gpu-wheels

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first: the pinned wheel; an unpinned torch would pull gigabytes of CUDA packages
	$(PIP) install -q torch==2.13.0
	# [cpu]: the onnxruntime CPU build; on a GPU machine use [gpu] instead (never both: same module)
	# [openvino]: the fastest CPU path, the default of load(export) on a CPU (its tests run in CI)
	$(PIP) install -q -e ".[cpu,openvino,export,test,serve,bench,web]"
	touch $@

demo: install
	$(VENV)/bin/segllm-edge demo

system-deps:
	bash tools/system_deps.sh

test: install system-deps
	$(PY) -m pytest -q

# Pillow wheels (CPython 3.10-3.13, x86_64, ~28 MB) for benchmarks/gpu/run.sh on a GPU machine that has no Pillow
# and no network: carry .gpu-wheels/ along; the run's preflight installs the matching wheel from it
gpu-wheels:
	for v in 3.10 3.11 3.12 3.13; do $(PYTHON) -m pip download -q --only-binary=:all: --no-deps \
	  --python-version $$v --platform manylinux_2_28_x86_64 pillow -d .gpu-wheels || exit 1; done

clean:
	rm -rf $(VENV) segllm-demo .pytest_cache
