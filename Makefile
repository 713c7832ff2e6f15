# Two commands on a fresh machine:
#   make demo   installs everything into .venv and runs the demo
#   make test   runs the test suite (installing first if needed: the venv, and the Debian packages the
#               tests use -- chromium, chromium-driver, openssl, redis-server -- via tools/system_deps.sh),
#               then the numpy-2 run (make test-numpy2: export, CPU paths and the client in a numpy-2 venv,
#               against a server in the numpy-1 venv; docs/numpy.md)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install system-deps demo test test-numpy2 clean gpu-wheels

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
	$(MAKE) test-numpy2

# numpy 2: everything but the Triton stub runs it (docs/numpy.md). A second venv without [serve] (its stub
# needs numpy<2) runs the tests of exporting, running an export and the client; the client's server is
# `serve` from the numpy-1 venv above (SEGLLM_SERVE_PYTHON).
NUMPY2_VENV  ?= .venv-numpy2
NUMPY2_PY    := $(NUMPY2_VENV)/bin/python
NUMPY2_TESTS := tests/test_numpy2.py tests/test_export.py tests/test_cpu_paths.py tests/test_pipeline_numpy.py \
                tests/test_shared_weights.py tests/test_kv_inplace.py tests/test_images.py \
                tests/test_mask_postprocess.py tests/test_eval_metrics.py tests/test_session_errors.py \
                tests/test_web.py tests/test_torch_free.py tests/test_bf16_feeds.py tests/test_llm_cache.py

$(NUMPY2_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(NUMPY2_VENV)
	$(NUMPY2_PY) -m pip install -q --upgrade pip
	$(NUMPY2_PY) -m pip install -q torch==2.13.0
	$(NUMPY2_PY) -m pip install -q -e ".[cpu,openvino,export,test,client,bench,web]" "numpy>=2"
	$(NUMPY2_PY) -c "import numpy, sys; sys.exit(f'numpy {numpy.__version__}: not 2') if int(numpy.__version__.split('.')[0]) < 2 else None"
	touch $@

test-numpy2: install system-deps $(NUMPY2_VENV)/.installed
	SEGLLM_SERVE_PYTHON=$(abspath $(PY)) $(NUMPY2_PY) -m pytest -q -p no:cacheprovider $(NUMPY2_TESTS)

# Pillow wheels (CPython 3.10-3.13, x86_64, ~28 MB) for benchmarks/gpu/run.sh on a GPU machine that has no Pillow
# and no network: carry .gpu-wheels/ along; the run's preflight installs the matching wheel from it
gpu-wheels:
	for v in 3.10 3.11 3.12 3.13; do $(PYTHON) -m pip download -q --only-binary=:all: --no-deps \
	  --python-version $$v --platform manylinux_2_28_x86_64 pillow -d .gpu-wheels || exit 1; done

clean:
	rm -rf $(VENV) $(NUMPY2_VENV) segllm-demo .pytest_cache
