# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the demo
#   make test   runs the test suite (installing first if needed: the venv, and the Debian packages the
#               tests use -- chromium, chromium-driver, openssl, redis-server -- via tools/system_deps.sh)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install system-deps demo test clean

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

clean:
	rm -rf $(VENV) segllm-demo .pytest_cache
