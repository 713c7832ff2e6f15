"""Builds the ``.[cpu,serve]`` venv for tests/test_torch_free.py in the background.

The build is mostly pip waiting on I/O (about 30 s of CPU in several minutes of wall time), so conftest starts it
as soon as collection has selected a torch-free test and the fixture only waits for it: the rest of the suite runs
meanwhile instead of the whole run waiting for pip."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_build: dict = {}


def start() -> None:
    """Copy the checkout (an in-tree build would leave build/ behind and reuse stale files) and start pip."""
    if _build:
        return
    base = Path(tempfile.mkdtemp(prefix="segllm-lean-"))
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "tests", "benchmarks",
                                                             "__pycache__", "*.egg-info", "segllm-demo", "runs"))
    venv = base / "venv"
    log = open(base / "build.log", "w")
    script = (f"{sys.executable} -m venv {venv} && {venv}/bin/python -m pip install -q --disable-pip-version-check "
              f"'{src}[cpu,serve]'")
    _build.update(base=base, venv=venv, log=base / "build.log",
                  proc=subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, cwd=base))


def wait() -> Path:
    """The venv once its build has finished (starting it now if nothing did); raises with pip's log on failure."""
    start()
    rc = _build["proc"].wait()
    if rc != 0:
        raise RuntimeError(f"building the lean venv failed (rc={rc}):\n{_build['log'].read_text()[-4000:]}")
    return _build["venv"]


def cleanup() -> None:
    if _build:
        if _build["proc"].poll() is None:
            _build["proc"].kill()
        shutil.rmtree(_build["base"], ignore_errors=True)
