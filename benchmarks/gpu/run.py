"""The GPU check: one command for an NVIDIA machine with torch + CUDA and no network (``benchmarks/gpu/run.sh``).

First a preflight (a few seconds, in this process): the versions of Python, torch, transformers, numpy, triton,
onnxruntime, Pillow; the LLM's forward signature and the KV-cache argument the package will pass it; the imports
each requested step needs. Anything missing stops the run there with one line saying what and how to fix it (exit
5), instead of a step failing minutes in. Pillow (the image preprocessing) is not on every GPU machine:
``make gpu-wheels`` downloads its wheels for CPython 3.10-3.13 into ``.gpu-wheels/`` (~28 MB, small enough to
carry to a machine without network), and the preflight installs the matching one from there (``--wheels DIR``)
when ``PIL`` does not import.

Steps, each in its own process with a time cap, all within ``--budget-s`` (default 480 s = 8 minutes; a step
that would not fit in what is left is skipped with a message):

1. ``install``  -- ``pip install --no-deps --no-build-isolation --no-index -e .`` (nothing downloaded; the steps
   also find the checkout on PYTHONPATH, so a failed install is reported and the run goes on);
2. ``fidelity`` -- the golden checkpoint (rebuilt from tests/golden) loaded with ``backend="cuda"``, the golden
   3-round conversation against the research code's outputs (mask IoU, winning query, logits, box);
3. ``kernels``  -- the OpenAI-Triton kernels (segllm_edge/kernels) against their PyTorch references on the GPU,
   at HIPIE's sizes (the encoder's 21,760 queries, the decoder's real 110 queries: the (16, 2) launch
   configuration), the post-process on the golden logits and on an empty mask, with the time of each side by side;
4. ``kvcopy``   -- what a host-side KV cache costs per round: host→device and device→host copies of the 7B
   bf16 cache (0.5 MiB per token) at 256 / 1,024 / 2,048 tokens, from pageable and from pinned host memory;
5. ``bench``    -- a random checkpoint of the full LLaVA-7B size built here (``make-tiny-checkpoint --hidden 4096
   --heads 32 --intermediate 11008 --layers 32 --clip-hidden 1024 --clip-layers 24 --dtype bf16``), loaded in bf16 on the
   GPU, and the per-round benchmark (segllm_edge.bench: caching vs recompute, interleaved).

Results go to ``benchmarks/results/<stamp>_gpu_<gpu>.json`` (``--out DIR`` to change), named after the GPU
nvidia-smi reports. Exit status: 0 every step that ran passed, 1 a step failed or timed out, 2 bad arguments,
3 no NVIDIA GPU (no nvidia-smi or it lists none), 4 torch has no CUDA (when a step needs it), 5 the preflight found
something missing.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
STEPS = ("install", "fidelity", "kernels", "kvcopy", "bench")
#: seconds each step may take at most (its process is killed past it); a step starts only if it fits
#: (they sum to 475 s: 5 s of the 480 s budget are left for this process itself: nvidia-smi, the preflight; the
#: kvcopy step moves ~7 GiB in all, a few seconds at PCIe rates, plus CUDA's start)
STEP_CAP_S = {"install": 35, "fidelity": 80, "kernels": 60, "kvcopy": 15, "bench": 285}
EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU, EXIT_NO_CUDA, EXIT_PREFLIGHT = 1, 2, 3, 4, 5
#: what the GPU steps import: (module, what to install, the steps that need it)
NEEDS = (("numpy", "numpy", ("fidelity", "kernels", "bench")),
         ("torch", "a CUDA build of torch", ("fidelity", "kernels", "kvcopy", "bench")),
         ("transformers", "transformers>=5.0,<5.40", ("fidelity", "bench")),
         ("safetensors", "safetensors", ("fidelity", "bench")),
         ("PIL", "Pillow (make gpu-wheels; --wheels DIR)", ("fidelity", "bench")),
         ("triton", "triton (OpenAI Triton, comes with CUDA torch)", ("kernels",)),
         ("segllm_edge", "this checkout (on PYTHONPATH)", ("fidelity", "kernels", "bench")))
#: reported when present, needed by no step (the GPU machine has no onnxruntime-gpu, no TensorRT)
OPTIONAL = ("onnxruntime", "ml_dtypes", "tensorrt")
WHEELS = ROOT / ".gpu-wheels"
#: the full LLaVA-1.5-7B sizes (LLM) and CLIP ViT-L/14 (make-tiny-checkpoint flags)
FULL_7B = dict(hidden=4096, heads=32, intermediate=11008, layers=32, clip_hidden=1024, clip_layers=24)


# ----------------------------------------------------------------------------------------------------------
# planning (pure: tested on CPU)
# ----------------------------------------------------------------------------------------------------------
def plan(skips: set[str], budget_s: float, elapsed_s: float, step: str) -> tuple[bool, str, float]:
    """Whether ``step`` runs now: ``(run, why_not, timeout_s)``."""
    if step in skips:
        return False, f"skipped (--skip-{step})", 0.0
    left = budget_s - elapsed_s
    cap = STEP_CAP_S[step]
    if left < cap:
        return False, f"skipped: {left:.0f} s left of the {budget_s:.0f} s budget, the step may take {cap} s", 0.0
    return True, "", float(cap)


def needs_cuda(skips: set[str]) -> bool:
    return any(s not in skips for s in ("fidelity", "kernels", "kvcopy", "bench"))


def gpu_info(nvidia_smi: str | None = None) -> dict | None:
    """The first GPU as nvidia-smi names it (``{"name", "memory", "driver"}``), None when there is none."""
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        return None
    parts = [p.strip() for p in lines[0].split(",")]
    parts += [""] * (3 - len(parts))
    return {"name": parts[0], "memory": parts[1], "driver": parts[2], "count": len(lines)}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "gpu"


def golden_questions() -> tuple[str, ...]:
    """The golden conversation, read from its one definition (tests/conftest.py) without importing pytest."""
    tree = ast.parse((ROOT / "tests" / "conftest.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "GOLDEN_QUESTIONS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("tests/conftest.py defines no GOLDEN_QUESTIONS")


# ----------------------------------------------------------------------------------------------------------
# the preflight (in this process, a few seconds)
# ----------------------------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    """The module's version, or None when it does not import (the import error is kept for the report)."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is "missing" with its reason
        _IMPORT_ERRORS[module] = f"{type(exc).__name__}: {exc}"[:300]
        return None
    return str(getattr(mod, "__version__", "?"))


_IMPORT_ERRORS: dict[str, str] = {}


def install_wheels(wheels: Path, package: str = "pillow") -> str:
    """``pip install --no-deps --no-index --find-links wheels package``: its last line, or why it failed."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--find-links", str(wheels), package]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return ((r.stdout or r.stderr).strip().splitlines() or [""])[-1] if r.returncode == 0 else \
        f"failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}"


def llm_forward() -> dict:
    """The installed transformers' LlamaModel.forward signature and the KV-cache argument the package passes."""
    from transformers import LlamaModel

    from segllm_edge.errors import BackendError
    from segllm_edge.modeling.llm import cache_kwarg

    out = {"signature": str(inspect.signature(LlamaModel.forward))}
    try:
        out["cache_kwarg"] = cache_kwarg(LlamaModel)
    except BackendError as exc:
        out["error"] = str(exc)
    return out


def preflight(skips: set[str], wheels: Path | None = None) -> dict:
    """Versions, the LLM forward, and what the requested steps need but cannot import: ``{"versions",
    "llm_forward", "missing": [line, ...], "seconds"}``."""
    t0 = time.perf_counter()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    steps = [s for s in STEPS if s not in skips and s != "install"]
    report: dict = {"python": sys.version.split()[0], "versions": {}, "missing": []}
    for module, _, _ in NEEDS:
        report["versions"][module] = _version(module)
    if report["versions"].get("PIL") is None and wheels is not None and wheels.is_dir() \
            and any(s in steps for s in ("fidelity", "bench")):
        report["pillow_install"] = install_wheels(wheels)
        importlib.invalidate_caches()
        _IMPORT_ERRORS.pop("PIL", None)
        report["versions"]["PIL"] = _version("PIL")
    for module in OPTIONAL:
        report["versions"][module] = _version(module)
    for module, hint, users in NEEDS:
        need = [s for s in users if s in steps]
        if need and report["versions"][module] is None:
            why = _IMPORT_ERRORS.get(module, "")
            report["missing"].append(f"{module} does not import{f' ({why})' if why else ''}; needed by {', '.join(need)}: install {hint}, "
                                     f"or pass {' '.join('--skip-' + s for s in need)}")
    if report["versions"].get("transformers") and report["versions"].get("segllm_edge"):
        try:
            report["llm_forward"] = llm_forward()
        except Exception as exc:  # noqa: BLE001
            report["llm_forward"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        if "error" in report["llm_forward"] and any(s in steps for s in ("fidelity", "bench")):
            report["missing"].append(f"the LLM's KV cache cannot be passed: {report['llm_forward']['error']}")
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def print_preflight(rep: dict) -> None:
    v = rep["versions"]
    print("gpu-check: preflight: python " + rep["python"] + ", "
          + ", ".join(f"{k} {v[k] or 'MISSING'}" for k in v if v[k] is not None or k not in OPTIONAL)
          + f" ({rep['seconds']:.1f} s)")
    if "pillow_install" in rep:
        print(f"gpu-check: preflight: Pillow from the shipped wheels: {rep['pillow_install']}")
    fwd = rep.get("llm_forward")
    if fwd:
        print(f"gpu-check: preflight: LlamaModel.forward{fwd.get('signature', '')}")
        print(f"gpu-check: preflight: the KV cache goes in as {fwd.get('cache_kwarg') or fwd.get('error')!r}")


# ----------------------------------------------------------------------------------------------------------
# the steps (each runs in a child process: python run.py --step NAME --workdir W)
# ----------------------------------------------------------------------------------------------------------
def step_install(work: Path) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
    return {"command": " ".join(cmd)}


def _golden_checkpoint(work: Path) -> Path:
    from segllm_edge.tiny import make_tiny_checkpoint

    ck = work / "golden_ckpt"
    entries = json.loads((GOLDEN / "state_dict_keys.json").read_text())["keys"]
    make_tiny_checkpoint(ck, entries=entries, force=True)
    shutil.copyfile(GOLDEN / "golden_config.json", ck / "config.json")
    return ck


def step_fidelity(work: Path) -> dict:
    import numpy as np
    import torch

    import segllm_edge

    torch.backends.cuda.matmul.allow_tf32 = False       # the golden run is fp32
    torch.backends.cudnn.allow_tf32 = False
    model = segllm_edge.load(_golden_checkpoint(work), backend="cuda")
    gold = np.load(GOLDEN / "rounds.npz")
    s = model.session(GOLDEN / "shapes_a.png")
    rounds, ok = [], True
    for r, q in enumerate(golden_questions(), 1):
        res = s.ask(q)
        want = np.unpackbits(gold[f"r{r}/final_mask_packed"]).astype(bool).reshape(1024, 1024)
        got = np.asarray(res.model_mask, dtype=bool)
        union = np.logical_or(got, want).sum()
        iou = 1.0 if union == 0 else float(np.logical_and(got, want).sum() / union)
        ref_logits = np.asarray(gold[f"r{r}/selected_query_mask_logits_256"], dtype=np.float64).reshape(256, 256)
        logits = np.asarray(res.mask_logits, dtype=np.float64).reshape(256, 256)
        rel = float(np.abs(logits - ref_logits).max() / max(np.abs(ref_logits).max(), 1e-12))
        query_ok = int(res.query_index) == int(np.asarray(gold[f"r{r}/selected_fg_query_id_last"]).reshape(-1)[0])
        passed = iou >= 0.99 and query_ok
        ok &= passed
        rounds.append({"round": r, "mask_iou": round(iou, 5), "query_index": int(res.query_index),
                       "query_matches": query_ok, "mask_logits_rel_err": rel, "passed": passed,
                       "timings_ms": {k: round(v, 2) for k, v in res.timings.items()}})
    if not ok:
        raise AssertionError(f"backend='cuda' differs from the research code's golden outputs: {rounds}")
    return {"backend": getattr(model.backend, "name", "?"), "device": str(getattr(model.backend, "device", "")),
            "rounds": rounds}


def _cuda_ms(fn, repeats: int = 20) -> float:
    import statistics

    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


#: the deformable-attention cases: HIPIE-R50's encoder (every pixel of its 4 levels a query) and its decoder's
#: real 110 queries (10 background + 100 foreground), which is what selects the kernel's small-block launch
#: configuration (BLOCK_Q, num_warps) = (16, 2) (kernels/deform_attn._launch_config: lq < 256)
HIPIE_LEVELS_1024 = ((128, 128), (64, 64), (32, 32), (16, 16))
HIPIE_QUERIES = 110
DEFORM_CASES = (("encoder", sum(h * w for h, w in HIPIE_LEVELS_1024), "float32", 1e-4),
                ("decoder", HIPIE_QUERIES, "float32", 1e-4), ("decoder_fp16", HIPIE_QUERIES, "float16", 2e-2))


def compare_postprocess(logits, input_hw, orig_hw, timed: bool = True, **blocks) -> dict:
    """The fused post-process kernel against its reference on ``logits``' device: masks and box equal (pixels
    whose upsampled logit is within 1e-5 of 0 may flip); an empty mask (box all -1) is a case like any other."""
    import torch

    from segllm_edge.kernels.mask_postprocess import postprocess_mask_triton
    from segllm_edge.modeling.mask_postprocess import postprocess_mask as pp_ref
    from segllm_edge.modeling.mask_postprocess import upsample_logits

    got = postprocess_mask_triton(logits, input_hw, orig_hw, **blocks)
    ref = pp_ref(logits, input_hw, orig_hw)
    bad = got["model_mask"] != ref["model_mask"]
    flips = int(bad.sum())
    flips_ok = flips == 0 or float(upsample_logits(logits)[bad].abs().max()) < 1e-5
    passed = bool(flips_ok and torch.equal(got["mask"], ref["mask"]) and torch.equal(got["mask_box"], ref["mask_box"]))
    rec = {"input_hw": list(input_hw), "orig_hw": list(orig_hw), "flipped_pixels": flips,
           "empty": not bool(ref["mask"].any()), "mask_box": ref["mask_box"].tolist(), "passed": passed}
    if timed:
        t_tri = _cuda_ms(lambda: postprocess_mask_triton(logits, input_hw, orig_hw, **blocks))
        t_ref = _cuda_ms(lambda: pp_ref(logits, input_hw, orig_hw))
        rec.update(triton_ms=t_tri, torch_ms=t_ref, torch_over_triton=t_ref / t_tri)
    return rec


def step_kernels(work: Path) -> dict:
    import numpy as np
    import torch

    import segllm_edge.kernels as K
    from segllm_edge.kernels.deform_attn import _launch_config, ms_deform_attn_triton
    from segllm_edge.modeling.hipie.deform_attn import ms_deform_attn as deform_ref

    if not K.available():
        raise RuntimeError("segllm_edge.kernels.available() is False: triton does not import or sees no GPU")
    dev = torch.device("cuda")
    shapes = [tuple(s) for s in HIPIE_LEVELS_1024]
    out, ok = {"deform_attn": [], "postprocess_mask": []}, True
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, lq, dtype_name, tol in DEFORM_CASES:
        dtype = getattr(torch, dtype_name)
        m, d, p = 8, 32, 4
        value = torch.randn(1, sum(h * w for h, w in shapes), m, d, generator=g).to(dev, dtype)
        loc = (torch.rand(1, lq, m, len(shapes), p, 2, generator=g) * 1.4 - 0.2).to(dev, dtype)
        aw = torch.rand(1, lq, m, len(shapes), p, generator=g)
        aw = (aw / aw.sum(dim=(-1, -2), keepdim=True)).to(dev, dtype)
        vf, lf, af = value.float(), loc.float(), aw.float()     # the reference runs in fp32 (as HIPIE does)
        got = ms_deform_attn_triton(value, shapes, loc, aw)
        ref = deform_ref(vf, shapes, lf, af)
        err = float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        t_tri = _cuda_ms(lambda: ms_deform_attn_triton(value, shapes, loc, aw))
        t_ref = _cuda_ms(lambda: deform_ref(vf, shapes, lf, af))
        passed = err <= tol
        ok &= passed
        out["deform_attn"].append({"case": name, "lq": lq, "dtype": str(dtype), "launch": _launch_config(lq, dtype),
                                   "rel_err": err, "tol": tol,
                                   "triton_ms": t_tri, "torch_ms": t_ref, "torch_over_triton": t_ref / t_tri,
                                   "passed": passed})
    data = np.load(GOLDEN / "postprocess_cases.npz")
    logits = torch.from_numpy(data["r1/logits"]).to(dev)
    empty = torch.full_like(logits, -1.0)              # no pixel above 0: an empty mask, box all -1
    for lg, input_hw, orig_hw in ((logits, (768, 1024), (480, 640)), (logits, (1024, 683), (1536, 1024)),
                                  (empty, (768, 1024), (480, 640))):
        rec = compare_postprocess(lg, input_hw, orig_hw)
        ok &= rec["passed"]
        out["postprocess_mask"].append(rec)
    if not ok:
        raise AssertionError(f"a Triton kernel differs from its reference on the GPU: {out}")
    return out


#: the conversation lengths the KV copy step measures
KV_TOKENS = (256, 1024, 2048)


def kv_bytes_per_token(layers: int = FULL_7B["layers"], hidden: int = FULL_7B["hidden"], itemsize: int = 2) -> int:
    """Key + value of every layer for one token (7B, bf16: 2 x 32 x 4096 x 2 B = 0.5 MiB)."""
    return 2 * layers * hidden * itemsize


def step_kvcopy(work: Path, layers: int = FULL_7B["layers"], **_) -> dict:
    import torch

    per_token = kv_bytes_per_token(layers)
    cases = []
    for tokens in KV_TOKENS:
        nbytes = tokens * per_token
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        for kind in ("pageable", "pinned"):
            host = torch.ones(nbytes, dtype=torch.uint8).pin_memory() if kind == "pinned" else \
                torch.ones(nbytes, dtype=torch.uint8)
            h2d = _cuda_ms(lambda: dev.copy_(host, non_blocking=True), repeats=5)
            d2h = _cuda_ms(lambda: host.copy_(dev, non_blocking=True), repeats=5)
            cases.append({"tokens": tokens, "bytes": nbytes, "host": kind, "h2d_ms": h2d, "d2h_ms": d2h,
                          "h2d_gb_s": nbytes / h2d / 1e6, "d2h_gb_s": nbytes / d2h / 1e6,
                          "round_trip_ms": h2d + d2h})
            del host
        del dev
    return {"bytes_per_token": per_token, "layers": layers, "cases": cases,
            "note": "a HostKVCache round moves the whole past to the device and the whole present back"}


def build_bench_checkpoint(ck: Path, sizes: dict) -> Path:
    """The bench's random checkpoint, written in bf16 as the released ones are (fp32 at 32 layers is ~26 GB
    to draw and write; bf16 half that, and the model is loaded in bf16 anyway)."""
    from segllm_edge.tiny import TinySizes, make_tiny_checkpoint

    return make_tiny_checkpoint(ck, TinySizes(**sizes, clip_intermediate=4 * sizes["clip_hidden"]), shards=8,
                                force=True, dtype="bf16")


def step_bench(work: Path, layers: int = 32, rounds: int = 12, repeats: int = 2) -> dict:
    import torch

    import segllm_edge
    from segllm_edge import bench as B
    free = torch.cuda.mem_get_info()[0]
    sizes = dict(FULL_7B, layers=layers)
    llm_bf16 = layers * 202_383_360 * 2                 # attention 4*4096^2 + MLP 3*4096*11008 per layer, bf16
    need_gpu, need_disk = llm_bf16 + 4 * 2**30, llm_bf16 + 3 * 2**30   # + CLIP-L, HIPIE; written in bf16
    if free < need_gpu:
        raise RuntimeError(f"the GPU has {free / 2**30:.1f} GiB free, the {layers}-layer 7B checkpoint needs "
                           f"~{need_gpu / 2**30:.0f} GiB in bf16")
    disk = shutil.disk_usage(work).free
    if disk < need_disk:
        raise RuntimeError(f"{work} has {disk / 2**30:.0f} GiB free; the bf16 checkpoint needs "
                           f"~{need_disk / 2**30:.0f} GiB (pass --workdir)")
    ck = work / "ck7b"
    t0 = time.perf_counter()
    build_bench_checkpoint(ck, sizes)
    built_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = segllm_edge.load(ck, backend="cuda", dtype="bfloat16")
    load_s = time.perf_counter() - t0
    shutil.rmtree(ck, ignore_errors=True)              # on the GPU now; free the disk
    from segllm_edge.contracts.demo import demo_image

    report = B.run_benchmark(model, demo_image(), rounds=rounds, repeats=repeats, warmup=1)
    i = model.info
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sizes.items()) + " --dtype bf16"
    report.update(machine=B.machine_info(), checkpoint_flags=flags,
                  build_s=built_s, load_s=load_s, backend="cuda", precision="bfloat16",
                  model_size={"hidden": i.hidden_size, "layers": i.num_layers, "clip_hidden": i.clip_hidden},
                  peak_gpu_bytes=torch.cuda.max_memory_allocated())
    return report


STEP_FUNCS = {"install": step_install, "fidelity": step_fidelity, "kernels": step_kernels, "kvcopy": step_kvcopy,
              "bench": step_bench}


def _child(step: str, work: Path, result: Path, extra: dict) -> int:
    t0 = time.perf_counter()
    try:
        out = STEP_FUNCS[step](work, **extra) if step in ("bench", "kvcopy") else STEP_FUNCS[step](work)
        rec = {"status": "passed", "result": out}
    except ModuleNotFoundError as exc:
        rec = {"status": "failed", "message": f"this Python lacks the module {exc.name!r} ({exc})"}
    except Exception as exc:  # noqa: BLE001 - reported in the results
        rec = {"status": "failed", "message": f"{type(exc).__name__}: {exc}"[:4000]}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    result.write_text(json.dumps(rec, indent=1, default=str))
    return 0 if rec["status"] == "passed" else 1


# ----------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------
def _torch_cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed in this Python"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return False, f"torch {torch.__version__} ({build}) sees no CUDA device"
    return True, f"torch {torch.__version__}, CUDA {torch.version.cuda}"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/gpu/run.sh", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (checkpoints); default: a temp dir")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time budget (default 480)")
    for s in STEPS:
        ap.add_argument(f"--skip-{s}", action="store_true", help=f"do not run the {s} step")
    ap.add_argument("--wheels", type=Path, default=WHEELS,
                    help="wheels to install Pillow from when it is missing (default .gpu-wheels, see make gpu-wheels)")
    ap.add_argument("--layers", type=int, default=32, help="LLM layers of the bench checkpoint (default 32: 7B)")
    ap.add_argument("--rounds", type=int, default=12, help="rounds per benchmark conversation")
    ap.add_argument("--repeats", type=int, default=2, help="benchmark repeats per mode")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)          # internal: run one step
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for name in ("layers", "rounds", "repeats"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if a.budget_s <= 0:
        ap.error("--budget-s must be > 0")
    return a


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    bench_kw = {"layers": a.layers, "rounds": a.rounds, "repeats": a.repeats}
    if a.step:
        return _child(a.step, a.workdir, a.result, bench_kw)

    t_start = time.monotonic()
    gpu = gpu_info()
    if gpu is None:
        print("gpu-check: no NVIDIA GPU here (nvidia-smi is missing or lists no GPU); nothing to check",
              file=sys.stderr)
        return EXIT_NO_GPU
    print(f"gpu-check: {gpu['name']} ({gpu['memory']}, driver {gpu['driver']})")
    skips = {s for s in STEPS if getattr(a, f"skip_{s}")}
    cuda_ok, cuda_msg = _torch_cuda() if needs_cuda(skips) else (True, "not needed (every GPU step skipped)")
    if not cuda_ok:
        print(f"gpu-check: {cuda_msg}; install a CUDA build of torch, or pass --skip-fidelity --skip-kernels "
              "--skip-kvcopy --skip-bench", file=sys.stderr)
        return EXIT_NO_CUDA
    print(f"gpu-check: {cuda_msg}")
    pre = preflight(skips, a.wheels)
    print_preflight(pre)
    if pre["missing"]:
        for line in pre["missing"]:
            print(f"gpu-check: STOP: {line}", file=sys.stderr)
        return EXIT_PREFLIGHT
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="segllm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)          # the kernels run on the GPU, not in the interpreter
    steps: dict[str, dict] = {}
    for step in STEPS:
        run, why, timeout = plan(skips, a.budget_s, time.monotonic() - t_start, step)
        if not run:
            steps[step] = {"status": "skipped", "message": why}
            print(f"gpu-check: {step}: {why}")
            continue
        print(f"gpu-check: {step} (at most {timeout:.0f} s) ...", flush=True)
        res = work / f"{step}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--workdir", str(work),
               "--result", str(res), "--layers", str(a.layers), "--rounds", str(a.rounds), "--repeats", str(a.repeats)]
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
            rec = json.loads(res.read_text()) if res.is_file() else {
                "status": "failed", "message": f"exited {p.returncode}: {(p.stderr or p.stdout)[-2000:]}"}
        except subprocess.TimeoutExpired:
            rec = {"status": "timeout", "message": f"killed after {timeout:.0f} s (its cap)"}
        rec.setdefault("seconds", round(time.monotonic() - t0, 2))
        steps[step] = rec
        print(f"gpu-check: {step}: {rec['status']} in {rec['seconds']:.0f} s"
              + (f" -- {rec['message'][:300]}" if rec.get("message") else ""), flush=True)
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    report = {"gpu": gpu, "torch": cuda_msg, "preflight": pre, "budget_s": a.budget_s, "total_s": round(time.monotonic() - t_start, 1),
              "steps": steps, "python": sys.version.split()[0], "note": "measured by benchmarks/gpu/run.sh"}
    path = a.out / f"{time.strftime('%Y%m%d-%H%M%S')}_gpu_{slug(gpu['name'])}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"gpu-check: results in {path} ({report['total_s']:.0f} s)")
    return EXIT_FAILED if any(s["status"] in ("failed", "timeout") for s in steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
