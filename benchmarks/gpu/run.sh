#!/usr/bin/env bash
# The GPU check in one command, for an NVIDIA machine with torch + CUDA and no network:
#   benchmarks/gpu/run.sh [--out DIR] [--skip-install] [--skip-fidelity] [--skip-kernels] [--skip-kvcopy]
#                         [--skip-bench] ...
# checks what it needs first (a few seconds: versions, the LLM forward signature, imports; Pillow from
# .gpu-wheels/ when missing, see make gpu-wheels; a clear STOP line and exit 5 when something is missing),
# installs this checkout without dependencies, runs the golden fidelity check with backend="cuda", the Triton
# kernels against their references and the per-round benchmark on a random full-7B checkpoint, in under
# 8 minutes; results under benchmarks/results/. The logic (and --help) is in run.py next to this file.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/run.py" "$@"
