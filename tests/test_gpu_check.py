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
    r = _run("--skip-install", "--skip-fidelity", "--skip-kernels", "--skip-kvcopy", "--skip-bench", "--out", str(out),
             fake_gpu=True, tmp_path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (result,) = out.glob("*_gpu_NVIDIA-H200.json")
    report = json.loads(result.read_text())
    assert report["gpu"]["name"] == "NVIDIA H200" and report["gpu"]["memory"] == "143771 MiB"
    assert {k: v["status"] for k, v in report["steps"].items()} == dict.fromkeys(
        ("install", "fidelity", "kernels", "kvcopy", "bench"), "skipped")
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
    assert not run.needs_cuda({"fidelity", "kernels", "kvcopy", "bench"}) and run.needs_cuda({"install"})
    assert run.needs_cuda({"fidelity", "kernels", "bench"})          # the KV copy step needs CUDA too
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


def test_preflight_reports_versions_and_the_llm_forward(tmp_path):
    run = _module()
    rep = run.preflight(set())
    assert rep["missing"] == [] or all("triton" in m for m in rep["missing"]), rep["missing"]
    assert rep["versions"]["torch"] and rep["versions"]["transformers"] and rep["versions"]["numpy"]
    fwd = rep["llm_forward"]
    assert fwd["cache_kwarg"] in ("cache", "past_key_values") and fwd["cache_kwarg"] in fwd["signature"]
    # and the all-skipped run carries it into its results
    out = tmp_path / "results"
    r = _run("--skip-install", "--skip-fidelity", "--skip-kernels", "--skip-kvcopy", "--skip-bench", "--out", str(out),
             fake_gpu=True, tmp_path=tmp_path)
    assert r.returncode == 0 and "gpu-check: preflight: python" in r.stdout and "KV cache goes in as" in r.stdout
    (result,) = out.glob("*_gpu_NVIDIA-H200.json")
    assert json.loads(result.read_text())["preflight"]["llm_forward"]["cache_kwarg"] == fwd["cache_kwarg"]


def _as_if_cuda(run, monkeypatch):
    monkeypatch.setattr(run, "gpu_info", lambda: {"name": "NVIDIA H100", "memory": "81559 MiB", "driver": "x",
                                                  "count": 1})
    monkeypatch.setattr(run, "_torch_cuda", lambda: (True, "torch (stand-in: CUDA)"))


def test_preflight_stops_with_one_line_per_missing_need(tmp_path, monkeypatch, capsys):
    run = _module()
    _as_if_cuda(run, monkeypatch)
    monkeypatch.setattr(run, "NEEDS", run.NEEDS + (("segllm_no_such_module", "the thing", ("kernels",)),))
    out = tmp_path / "out"
    assert run.main(["--skip-install", "--out", str(out)]) == run.EXIT_PREFLIGHT
    err = capsys.readouterr().err
    assert "gpu-check: STOP: segllm_no_such_module does not import" in err and "--skip-kernels" in err
    assert "Traceback" not in err and not out.exists()            # stopped before any step
    # skipping the step that needs it lets the run go on
    assert not any("segllm_no_such_module" in m for m in run.preflight({"kernels"})["missing"])


def test_preflight_stops_when_the_llm_takes_no_cache(monkeypatch):
    run = _module()
    monkeypatch.setattr(run, "llm_forward", lambda: {"signature": "(self, inputs_embeds, **kwargs)",
                                                     "error": "LlamaModel.forward takes no KV-cache argument"})
    rep = run.preflight(set())
    assert any("KV cache cannot be passed" in m for m in rep["missing"])
    assert not any("KV cache" in m for m in run.preflight({"fidelity", "bench"})["missing"])


def test_preflight_installs_pillow_from_the_shipped_wheels(tmp_path, monkeypatch):
    run = _module()
    installed = []
    real = run._version
    monkeypatch.setattr(run, "_version", lambda m: None if m == "PIL" and not installed else real(m))
    monkeypatch.setattr(run, "install_wheels", lambda d, package="pillow": installed.append(d) or "Successfully")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    rep = run.preflight({"kernels"}, wheels)
    assert installed == [wheels] and rep["pillow_install"] == "Successfully" and rep["versions"]["PIL"]
    assert rep["missing"] == []
    installed.clear()
    rep = run.preflight({"kernels"}, None)                          # no wheels: a clear line
    assert any(m.startswith("PIL does not import") and "Pillow" in m for m in rep["missing"])


def test_kernel_step_cases_run_hipie_queries_and_an_empty_mask(tmp_path):
    """The kernels step's cases: the decoder at HIPIE's real 110 queries (the kernel's (16, 2) launch
    configuration), and the post-process comparison (the step's own function) on the golden logits and on an
    empty mask, here through the Triton interpreter on the CPU."""
    pytest.importorskip("triton")
    code = f"""
import json, sys
import numpy as np, torch
sys.path.insert(0, {str(ROOT / 'benchmarks' / 'gpu')!r})
import run
from segllm_edge.kernels.deform_attn import _launch_config
dec = [c for c in run.DEFORM_CASES if c[0].startswith("decoder")]
launch = [list(_launch_config(lq, getattr(torch, dt))) for _, lq, dt, _ in dec]
logits = torch.from_numpy(np.load(run.GOLDEN / "postprocess_cases.npz")["r1/logits"])
recs = [run.compare_postprocess(lg, (768, 1024), (48, 64), timed=False, block_y=64, block_x=256)
        for lg in (logits, torch.full_like(logits, -1.0))]
print(json.dumps({{"lq": [c[1] for c in dec], "launch": launch, "recs": recs}}))
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["lq"] == [110, 110] and got["launch"] == [[16, 2], [16, 2]]
    full, empty = got["recs"]
    assert full["passed"] and not full["empty"]
    assert empty["passed"] and empty["empty"] and empty["mask_box"] == [-1, -1, -1, -1]


def test_kv_copy_step_measures_the_7b_cache_at_three_lengths():
    run = _module()
    assert run.kv_bytes_per_token() == 2**19                           # 0.5 MiB per token, 7B in bf16
    assert run.KV_TOKENS == (256, 1024, 2048) and "kvcopy" in run.STEPS and "kvcopy" in run.STEP_CAP_S
