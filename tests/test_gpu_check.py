"""benchmarks/gpu/run.sh on a machine without a GPU: its arguments, its skips and its exit codes.

The GPU steps themselves need an NVIDIA device; here nvidia-smi is absent, or a fake one on PATH names a GPU
that CPU-only torch cannot see."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "benchmarks" / "gpu" / "run.sh"
FAKE_SMI = "#!/bin/sh\necho 'NVIDIA H200, 143771 MiB, 570.86.15'\n"


def _run(*args, fake_gpu: bool, tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    smi = bindir / "nvidia-smi"
    if fake_gpu:
        smi.write_text(FAKE_SMI)
        smi.chmod(0o755)
    elif smi.exists():
        smi.unlink()
    path = [str(bindir)] + [p for p in os.environ.get("PATH", "").split(os.pathsep)
                            if p and not (Path(p) / "nvidia-smi").exists()]
    env = dict(os.environ, PATH=os.pathsep.join(path), PYTHON=sys.executable)
    return subprocess.run(["bash", str(RUN_SH), *args], capture_output=True, text=True, env=env, timeout=120)


def _module():
    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "benchmarks" / "gpu" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_gpu_exits_3_with_a_message(tmp_path):
    r = _run("--skip-install", "--out", str(tmp_path / "out"), fake_gpu=False, tmp_path=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "no NVIDIA GPU" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_but_no_torch_cuda_exits_4(tmp_path):
    r = _run("--skip-install", "--out", str(tmp_path / "out"), fake_gpu=True, tmp_path=tmp_path)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "NVIDIA H200" in r.stdout and "sees no CUDA device" in r.stderr and "--skip-bench" in r.stderr


def test_all_gpu_steps_skipped_writes_results_named_after_the_gpu(tmp_path):
    out = tmp_path / "results"
    r = _run("--skip-install", "--skip-fidelity", "--skip-kernels", "--skip-bench", "--out", str(out),
             fake_gpu=True, tmp_path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (result,) = out.glob("*_gpu_NVIDIA-H200.json")
    report = json.loads(result.read_text())
    assert report["gpu"]["name"] == "NVIDIA H200" and report["gpu"]["memory"] == "143771 MiB"
    assert {k: v["status"] for k, v in report["steps"].items()} == dict.fromkeys(
        ("install", "fidelity", "kernels", "bench"), "skipped")
    assert "--skip-bench" in report["steps"]["bench"]["message"]


@pytest.mark.parametrize("args,match", [(["--bogus"], "unrecognized arguments"),
                                        (["--layers", "0"], "--layers must be >= 1"),
                                        (["--budget-s", "-5"], "--budget-s must be > 0")])
def test_bad_arguments_exit_2(tmp_path, args, match):
    r = _run(*args, fake_gpu=True, tmp_path=tmp_path)
    assert r.returncode == 2 and match in r.stderr


def test_budget_plan_skips_what_would_not_fit():
    run = _module()
    assert run.plan(set(), 480, 0, "bench") == (True, "", float(run.STEP_CAP_S["bench"]))
    ok, why, _ = run.plan(set(), 480, 480 - run.STEP_CAP_S["bench"] + 1, "bench")
    assert not ok and "budget" in why and f"may take {run.STEP_CAP_S['bench']} s" in why
    assert run.plan({"kernels"}, 480, 0, "kernels")[:2] == (False, "skipped (--skip-kernels)")
    assert sum(run.STEP_CAP_S.values()) <= 480              # every step fits the 8 minutes together
    assert not run.needs_cuda({"fidelity", "kernels", "bench"}) and run.needs_cuda({"install"})
    assert run.golden_questions()[0] == "Segment the red circle."


def test_bench_checkpoint_is_written_in_bf16(tmp_path):
    """The 7B bench checkpoint is drawn and written in bf16 (fp32 at 32 layers is ~26 GB), at a small size here."""
    from safetensors import safe_open

    run = _module()
    ck = run.build_bench_checkpoint(tmp_path / "ck", dict(hidden=64, heads=4, intermediate=128, layers=1,
                                                          clip_hidden=64, clip_layers=1))
    dtypes = set()
    for f in ck.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dtypes |= {str(st.get_slice(k).get_dtype()) for k in st.keys() if "layers.0.mlp" in k}
    assert dtypes == {"BF16"}
