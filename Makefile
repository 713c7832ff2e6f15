# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the demo
#   make test   runs the test suite (installing first if needed)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first: the pinned wheel; an unpinned torch would pull gigabytes of CUDA packages
	$(PIP) install -q torch==2.13.0
	# [cpu]: the onnxruntime CPU build; on a GPU machine use [gpu] instead (never both: same module)
	$(PIP) install -q -e ".[cpu,export,test,serve,bench]"
	touch $@

demo: install
	$(VENV)/bin/segllm-edge demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) segllm-demo .pytest_cache
