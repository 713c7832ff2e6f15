"""Triton kernels vs the PyTorch references, run through the Triton interpreter (no GPU needed).

Sizes are small: the interpreter executes every program in numpy.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import triton  # noqa: E402,F401
except Exception as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"triton cannot be imported ({exc!r}); the kernels are optional", allow_module_level=True)

import segllm_edge.kernels as K  # noqa: E402
from segllm_edge.kernels.deform_attn import ms_deform_attn_triton  # noqa: E402
from segllm_edge.kernels.mask_postprocess import postprocess_mask_triton  # noqa: E402
from segllm_edge.modeling.hipie.deform_attn import ms_deform_attn as deform_ref  # noqa: E402
from segllm_edge.modeling.mask_postprocess import postprocess_mask as pp_ref  # noqa: E402
from segllm_edge.modeling.mask_postprocess import upsample_logits  # noqa: E402

# bigger tiles than the GPU default keep the interpreter fast, but still several tiles per output
PP_BLOCKS = dict(block_y=64, block_x=256)


def _deform_inputs(shapes, n=2, lq=16, m=2, d=8, p=2, lo=-0.2, hi=1.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g) * (hi - lo) + lo
    aw = torch.rand(n, lq, m, len(shapes), p, generator=g)
    aw = aw / aw.sum(dim=(-1, -2), keepdim=True)
    return value, loc, aw


def test_available_under_interpreter():
    assert K.available()


@pytest.mark.parametrize("shapes,kw", [
    ([(8, 8), (4, 4)], {}),
    ([(8, 8), (4, 4)], dict(lq=37, m=3, d=6, p=3)),             # non-power-of-2 D, partial query block
    ([(6, 10), (3, 5), (2, 3)], dict(n=1, lq=21, p=4, d=4)),     # non-square levels, 3 levels
    ([(5, 7)], dict(n=1, lq=8, m=1, d=16, p=1)),
])
def test_deform_attn_fp32_matches_reference(shapes, kw):
    value, loc, aw = _deform_inputs(shapes, **kw)
    out = ms_deform_attn_triton(value, shapes, loc, aw)
    ref = deform_ref(value, shapes, loc, aw)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_deform_attn_zero_padding_outside():
    shapes = [(8, 8), (4, 4)]
    value, loc, aw = _deform_inputs(shapes, lo=-3.0, hi=4.0, seed=1)
    # exact edges, pixel centres and far-away points too
    loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 0.0])
    loc[0, 0, 0, 0, 1] = torch.tensor([1.0, 1.0])
    loc[0, 1, 0, 0, 0] = torch.tensor([0.5 / 8, 7.5 / 8])
    loc[0, 1, 1, 1, 1] = torch.tensor([1e9, -1e9])
    loc[1, 2, 1, 0, 0] = torch.tensor([-1.0 / 16, 0.5])  # exactly one pixel left of the first centre: zero
    out = ms_deform_attn_triton(value, shapes, loc, aw)
    ref = deform_ref(value, shapes, loc, aw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # all samples outside → exactly zero
    far = torch.full_like(loc, 2.0)
    assert torch.equal(ms_deform_attn_triton(value, shapes, far, aw), torch.zeros_like(ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_deform_attn_half_inputs(dtype):
    shapes = [(8, 8), (4, 4)]
    value, loc, aw = (t.to(dtype) for t in _deform_inputs(shapes, seed=2))
    out = ms_deform_attn_triton(value, shapes, loc, aw)
    assert out.dtype == dtype
    ref = deform_ref(value.float(), shapes, loc.float(), aw.float())  # same rounded inputs, fp32 maths
    tol = 1e-2 if dtype == torch.float16 else 2e-2   # one final rounding to the output dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_deform_attn_rejects_bad_shapes():
    shapes = [(8, 8), (4, 4)]
    value, loc, aw = _deform_inputs(shapes)
    with pytest.raises(ValueError):
        ms_deform_attn_triton(value, [(8, 8), (4, 5)], loc, aw)
    with pytest.raises(ValueError):
        ms_deform_attn_triton(value, shapes, loc, aw[..., :1])


def _blob_logits(seed: int) -> torch.Tensor:
    """Smooth random logits with a few positive blobs (a realistic mask with a non-trivial box)."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(1, 1, 256, 256, generator=g), 15, 1, 7)[0, 0] * 12 - 0.5
    return x


def _check_pp(out, ref, logits):
    assert out["model_mask"].dtype == torch.bool and out["mask"].dtype == torch.bool
    assert out["mask_box"].dtype == torch.int64 and out["mask_box"].shape == (4,)
    bad = out["model_mask"] != ref["model_mask"]
    if bad.any():  # only fp32 rounding of logits that are ~0 may flip
        assert upsample_logits(logits)[bad].abs().max() < 1e-5
    assert torch.equal(out["mask"], ref["mask"])
    assert torch.equal(out["mask_box"], ref["mask_box"])


@pytest.mark.parametrize("input_hw,orig_hw,seed", [
    ((768, 1024), (480, 640), 0),     # downscale, landscape (the golden image)
    ((1024, 700), (333, 227), 1),     # portrait, odd sizes
    ((300, 1024), (380, 1297), 2),    # upscaling, very wide
    ((1024, 1024), (1024, 1024), 3),  # identity resize
])
def test_mask_postprocess_kernel_matches_reference(input_hw, orig_hw, seed):
    logits = _blob_logits(seed)
    ref = pp_ref(logits, input_hw, orig_hw)
    out = postprocess_mask_triton(logits, input_hw, orig_hw, **PP_BLOCKS)
    _check_pp(out, ref, logits)
    assert ref["mask"].any() and not ref["mask"].all()  # the box is a real test


def test_mask_postprocess_kernel_random_logits_and_empty():
    logits = torch.randn(256, 256, generator=torch.Generator().manual_seed(7))
    _check_pp(postprocess_mask_triton(logits, (640, 512), (50, 40), **PP_BLOCKS), pp_ref(logits, (640, 512), (50, 40)),
              logits)
    # a single positive logit: box of a few pixels, far from tile 0
    one = torch.full((256, 256), -5.0)
    one[200, 37] = 5.0
    out = postprocess_mask_triton(one, (1024, 1024), (700, 500), **PP_BLOCKS)
    _check_pp(out, pp_ref(one, (1024, 1024), (700, 500)), one)
    empty = postprocess_mask_triton(torch.full((256, 256), -1.0), (768, 1024), (48, 64), **PP_BLOCKS)
    assert not empty["model_mask"].any() and not empty["mask"].any()
    assert empty["mask_box"].tolist() == [-1, -1, -1, -1]


def test_mask_postprocess_kernel_golden_logits(golden_dir):
    data = np.load(golden_dir / "postprocess_cases.npz")
    logits = torch.from_numpy(data["r1/logits"])
    final = torch.from_numpy(np.unpackbits(data["r1/final_mask_packed"]).astype(bool).reshape(1024, 1024))
    out = postprocess_mask_triton(logits, (768, 1024), (480, 640), **PP_BLOCKS)
    _check_pp(out, pp_ref(logits, (768, 1024), (480, 640)), logits)
    bad = out["model_mask"] != final
    assert not bad.any() or upsample_logits(logits)[bad].abs().max() < 1e-5


def test_dispatch():
    shapes = [(4, 4), (2, 2)]
    value, loc, aw = _deform_inputs(shapes, n=1, lq=4, m=1, d=4, p=1)
    ref = deform_ref(value, shapes, loc, aw)
    # CPU tensors take the reference under "auto", even with the interpreter on
    assert torch.equal(K.ms_deform_attn(value, shapes, loc, aw), ref)
    torch.testing.assert_close(K.ms_deform_attn(value, shapes, loc, aw, backend="triton"), ref, atol=1e-5, rtol=1e-5)
    logits = _blob_logits(4)
    r = K.postprocess_mask(logits, (768, 1024), (48, 64))
    assert torch.equal(r["mask"], pp_ref(logits, (768, 1024), (48, 64))["mask"])
    with pytest.raises(ValueError):
        K.postprocess_mask(logits, (768, 1024), (48, 64), backend="cuda")


def test_import_without_triton(tmp_path):
    """``import segllm_edge.kernels`` works and falls back where triton is missing."""
    import subprocess
    import sys

    (tmp_path / "triton.py").write_text("raise ImportError('no triton here')\n")
    code = ("import segllm_edge.kernels as K, torch, sys; assert not K.available(); "
            "assert 'segllm_edge.kernels.deform_attn' not in sys.modules; "
            "x = torch.zeros(256, 256); print(K.postprocess_mask(x, (8, 8), (4, 4))['mask_box'].tolist())")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[-1, -1, -1, -1]"


_AOT_SCRIPT = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as exc:
    print("SKIP", repr(exc)); sys.exit(0)
from segllm_edge.kernels.deform_attn import _launch_config, _ms_deform_attn_fwd
from segllm_edge.kernels.mask_postprocess import _mask_postprocess_kernel
import torch
target, aligned = GPUTarget("cuda", 90, 32), [["tt.divisibility", 16]]
try:
    for dt, tdt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for lq in (21760, 110):
            bq, nw = _launch_config(lq, tdt)
            sig = {"value_ptr": "*" + dt, "shapes_ptr": "*i32", "starts_ptr": "*i32", "loc_ptr": "*" + dt,
                   "attw_ptr": "*" + dt, "out_ptr": "*" + dt, "S": "i32", "Lq": "i32", "M": "constexpr",
                   "D": "constexpr", "L": "constexpr", "P": "constexpr", "BLOCK_Q": "constexpr", "BLOCK_D": "constexpr"}
            src = ASTSource(_ms_deform_attn_fwd, sig, constexprs={"M": 8, "D": 32, "L": 4, "P": 4, "BLOCK_Q": bq,
                            "BLOCK_D": 32}, attrs={(i,): aligned for i in (0, 3, 4, 5)})
            k = triton.compile(src, target=target, options={"num_warps": nw})
            assert k.asm["cubin"] and "ld.global.v4" in k.asm["ptx"], (dt, lq)  # vectorised row gathers
    sig = {"logits_ptr": "*fp32", "frame_ptr": "*u8", "orig_ptr": "*u8", "ys_ptr": "*i32", "xs_ptr": "*i32",
           "box_ptr": "*i32", "IN_H": "i32", "IN_W": "i32", "scale_h": "fp32", "scale_w": "fp32", "H": "i32",
           "W": "i32", "n_frame_tiles": "i32", "orig_tiles_x": "i32", "OUT": "constexpr", "BLOCK_Y": "constexpr",
           "BLOCK_X": "constexpr"}
    src = ASTSource(_mask_postprocess_kernel, sig, constexprs={"OUT": 1024, "BLOCK_Y": 16, "BLOCK_X": 128},
                    attrs={(i,): aligned for i in range(6)})
    assert triton.compile(src, target=target, options={"num_warps": 4}).asm["cubin"]
except (ImportError, FileNotFoundError, RuntimeError) as exc:
    if "ptxas" in repr(exc) or isinstance(exc, (ImportError, FileNotFoundError)):
        print("SKIP", repr(exc)); sys.exit(0)
    raise
print("OK")
"""


def test_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: build real sm_90 cubins (no GPU needed)."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if res.stdout.startswith("SKIP"):
        pytest.skip(f"cannot compile for CUDA here: {res.stdout.strip()}")
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]
