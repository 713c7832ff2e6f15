"""TensorRT engine builder and backend, without TensorRT: the static op check, optimisation profiles,
engine cache keys, build planning, the plain errors where TensorRT / CUDA are missing, and the
TensorRT backend's own logic (BOS-prefix KV cache, preallocated device pools, profile selection, call
splitting, token accounting) driven end to end by a stand-in ``tensorrt`` module whose "engines" run
the ONNX graphs with onnxruntime on the CPU. The stand-in checks what real TensorRT checks at these
calls (shapes inside the selected profile, no zero-sized KV cache, non-null addresses); it is not
TensorRT, and nothing here says a real TensorRT parses or builds these graphs.

The golden export (conftest ``golden_export``, SEGLLM_TEST_EXPORT_DIR reuses one) is shared read-only.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

import segllm_edge
from conftest import GOLDEN_QUESTIONS
from segllm_edge.errors import BackendError
from segllm_edge.contracts.backends import BACKENDS
from segllm_edge.contracts.manifest import Manifest, TensorSpec
from segllm_edge.export.tensorrt import builder as B
from segllm_edge.contracts import engines as C
from segllm_edge.export.tensorrt import ops
from segllm_edge.contracts import engine_profiles as P

FAKE_DEVICE = C.DeviceInfo("NVIDIA Fake GPU 80GB", (9, 0), "10.1.0.27")


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# =============================================================================================== op check
def _model(nodes, inputs, outputs, inits=(), opset=18, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]]
    return helper.make_model(g, opset_imports=imports)


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def test_every_graph_of_the_export_passes_the_op_check(golden_export):
    found = ops.check_export(golden_export)
    assert set(found) == set(Manifest.load(golden_export).graphs)
    for name, issues in found.items():
        assert not ops.errors(issues), f"{name}:\n{ops.format_issues(issues)}"
    # the check really looked at the graphs: the HIPIE decoder's deformable attention is GridSample
    assert ops.op_inventory(golden_export / "mask_decoder.onnx").get("GridSample", 0) > 0


@pytest.mark.parametrize("op,inputs,outputs,attrs", [
    ("DynamicQuantizeLinear", ["x"], ["y", "s", "z"], {}),
    ("Unique", ["x"], ["y"], {}),
    ("MatMulInteger", ["x", "x"], ["y"], {}),
])
def test_unsupported_operator_is_reported(op, inputs, outputs, attrs):
    node = helper.make_node(op, inputs, outputs, name=f"bad_{op}", **attrs)
    m = _model([node], [_vi("x", [2, 3])], [_vi(o, None) for o in outputs])
    errs = ops.errors(ops.check_graph(m))
    assert [(e.node, e.op) for e in errs] == [(f"bad_{op}", op)]
    assert "not supported" in errs[0].message


def test_unknown_and_contrib_operators_are_reported():
    nodes = [helper.make_node("MatMulNBits", ["x"], ["y"], name="q4", domain="com.microsoft"),
             helper.make_node("Foo", ["y"], ["z"], name="foo", domain="my.ops"),
             helper.make_node("Bar", ["z"], ["w"], name="bar")]
    m = _model(nodes, [_vi("x", [2, 3])], [_vi("w", None)], domains=("com.microsoft", "my.ops"))
    errs = {e.node: e.message for e in ops.errors(ops.check_graph(m))}
    assert "onnxruntime contrib operator" in errs["q4"]
    assert "plugin" in errs["foo"]
    assert "not in the declared op list" in errs["bar"]


def test_unsupported_op_inside_a_subgraph_is_reported():
    then_g = helper.make_graph([helper.make_node("Unique", ["x"], ["u"], name="inner_unique")], "then", [],
                               [_vi("u", None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["v"], name="inner_id")], "else", [],
                               [_vi("v", None)])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    m = _model([node], [_vi("c", [], TensorProto.BOOL), _vi("x", [3])], [_vi("y", None)])
    errs = ops.errors(ops.check_graph(m))
    assert [e.node for e in errs] == ["inner_unique"] and "branch" in errs[0].where


def _resize(**attrs):
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", **attrs)
    return _model([node], [_vi("x", [1, 1, 4, 4])], [_vi("y", None)], inits=[scales])


@pytest.mark.parametrize("attrs,severity,words", [
    (dict(mode="linear", coordinate_transformation_mode="align_corners"), None, None),
    (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), None, None),
    (dict(mode="area"), "error", "mode='area' unsupported"),
    (dict(mode="cubic"), "warning", "cubic"),
    (dict(mode="linear", coordinate_transformation_mode="half_pixel_symmetric"), "error", "half_pixel_symmetric"),
    (dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"), "error", "tf_crop_and_resize"),
    (dict(mode="linear", antialias=1), "error", "antialias"),
    (dict(mode="nearest", keep_aspect_ratio_policy="not_larger"), "error", "keep_aspect_ratio_policy"),
])
def test_resize_modes(attrs, severity, words):
    found = [i for i in ops.check_graph(_resize(**attrs)) if i.op == "Resize"]
    if severity is None:
        assert found == []
    else:
        assert [i.severity for i in found] == [severity] and words in found[0].message


def test_runtime_axes_and_einsum_limits_are_reported():
    nodes = [helper.make_node("Shape", ["x"], ["sh"], name="shape"),
             helper.make_node("Slice", ["x", "st", "en", "sh"], ["s"], name="slice_runtime_axes"),
             helper.make_node("Einsum", ["x"], ["d"], name="diag", equation="ii->i"),
             helper.make_node("Einsum", ["x", "x"], ["e"], name="ell", equation="...i,...i->..."),
             helper.make_node("TopK", ["x", "k"], ["v", "ix"], name="topk_big")]
    inits = [helper.make_tensor("st", TensorProto.INT64, [2], [0, 0]),
             helper.make_tensor("en", TensorProto.INT64, [2], [1, 1]),
             helper.make_tensor("k", TensorProto.INT64, [1], [4000])]
    m = _model(nodes, [_vi("x", [3, 3])], [_vi(o, None) for o in ("s", "d", "e", "v")], inits=inits)
    errs = {e.node: e.message for e in ops.errors(ops.check_graph(m))}
    assert set(errs) == {"slice_runtime_axes", "diag", "ell", "topk_big"}
    assert "constant" in errs["slice_runtime_axes"] and "ellipsis" in errs["ell"] and "3840" in errs["topk_big"]


def test_old_opset_is_reported():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [_vi("x", [2])], [_vi("y", [2])], opset=8)
    assert any(i.severity == "error" and "opset 8" in i.message for i in ops.check_graph(m))


# ============================================================================================== profiles
def test_profiles_cover_every_dynamic_axis(golden_export):
    man = Manifest.load(golden_export)
    limits = P.ProfileLimits.from_manifest(man)
    profs = P.make_profiles(man, limits)
    assert P.check_profiles(man, profs, limits) == []
    for name, spec in man.graphs.items():
        for prof in profs[name]:
            for t in spec.inputs:
                for axis in t.dynamic_axes.values():
                    r = prof.axes[axis]
                    assert 1 <= r.min <= r.opt <= r.max, (name, prof.name, axis)
    ctx = int(man.model["max_context"])
    llm = profs["llm"]
    assert [p.name for p in llm] == ["prefill", "round"]
    assert all(p.axes["past"].min == 1 and p.axes["past"].max == ctx - 1 and p.axes["seq"].max == ctx - 1 for p in llm)
    # a first round (BOS in the cache, the rest as seq) and a late round both select a profile
    assert P.select_profile(llm, {"batch": 1, "seq": 300, "past": 1}) == 0
    assert P.select_profile(llm, {"batch": 1, "seq": 30, "past": 600}) == 1
    assert P.select_profile(llm, {"batch": 1, "seq": 30, "past": 0}) is None
    # profiles survive the sidecar's JSON
    assert P.profiles_from_json(json.loads(json.dumps(P.profiles_to_json(profs)))) == profs


def test_empty_tensor_strategy_allows_past_zero(golden_export):
    man = Manifest.load(golden_export)
    limits = P.ProfileLimits.from_manifest(man, empty_past="empty_tensor")
    profs = P.make_profiles(man, limits)
    assert P.check_profiles(man, profs, limits) == []
    assert all(p.axes["past"].min == 0 for p in profs["llm"])
    # without the strategy, past min 0 is a problem
    assert any("past" in s for s in P.check_profiles(man, profs))


def _with_extra_axis(man: Manifest) -> Manifest:
    g = man.graphs["vision_encoder"]
    pix = g.inputs[0]
    new_in = (TensorSpec(pix.name, pix.dtype, ("batch", 3, "height", "width")),)
    graphs = dict(man.graphs)
    graphs["vision_encoder"] = dataclasses.replace(g, inputs=new_in)
    return dataclasses.replace(man, graphs=graphs)


def test_uncovered_dynamic_axis_is_reported(golden_export):
    man = Manifest.load(golden_export)
    wider = _with_extra_axis(man)
    # profiles made for the old manifest, checked against the new one
    problems = P.check_profiles(wider, P.make_profiles(man))
    assert any("'height'" in p for p in problems) and any("'width'" in p for p in problems)
    # profiles made from the new manifest: no range is known for the new axes
    problems = P.check_profiles(wider, P.make_profiles(wider))
    assert any("dynamic axis 'height' has no range" in p for p in problems)
    # an output-only axis that is not derived from inputs
    llm = wider.graphs["llm"]
    out0 = llm.outputs[0]
    bad = dataclasses.replace(llm, outputs=(TensorSpec(out0.name, out0.dtype, ("batch", "mystery", 128)),
                                            *llm.outputs[1:]))
    odd = dataclasses.replace(man, graphs={**man.graphs, "llm": bad})
    assert any("'mystery'" in p for p in P.check_profiles(odd, P.make_profiles(odd)))


def test_plan_build_refuses_an_export_with_an_uncovered_axis(golden_export, tmp_path):
    out = tmp_path / "wide"
    out.mkdir()
    for f in golden_export.iterdir():
        if f.name != "manifest.json":
            os.symlink(f, out / f.name)
    _with_extra_axis(Manifest.load(golden_export)).save(out)
    with pytest.raises(BackendError, match="do not cover the export.*height"):
        B.plan_build(out, "fp16")


# ================================================================================== engine cache keys
def _key(**kw):
    base = dict(graph="llm", precision="fp16", device=FAKE_DEVICE, onnx_sha256="a" * 64, profile_hash="p1",
                options_hash="o1")
    base.update(kw)
    return C.EngineKey.for_device(base.pop("graph"), base.pop("precision"), base.pop("device"), **base)


def test_engine_key_and_path():
    k = _key()
    p = C.engine_path("/e", k)
    assert p.parent == Path("/e") and p.suffix == ".plan"
    assert p.name.startswith("llm.fp16.nvidia-fake-gpu-80gb.sm_90.trt10.1.0.27.")
    assert C.engine_path("/e", _key(onnx_sha256="b" * 64)) != p          # another graph → another file
    assert C.engine_path("/e", _key(profile_hash="p2")) != p
    assert C.engine_path("/e", _key(device=dataclasses.replace(FAKE_DEVICE, trt_version="10.3.0"))) != p
    assert C.engine_path("/e", _key(precision="bf16")) != p


def _meta(**kw):
    k = _key(**kw)
    d = dataclasses.asdict(k)
    d["compute_capability"] = list(k.compute_capability)
    return d


@pytest.mark.parametrize("device,words", [
    (dataclasses.replace(FAKE_DEVICE, compute_capability=(8, 7)), ["sm_90", "sm_87"]),
    (dataclasses.replace(FAKE_DEVICE, trt_version="10.3.0.26"), ["TensorRT 10.1", "TensorRT 10.3"]),
    (dataclasses.replace(FAKE_DEVICE, trt_version="10.1.0.99"), ["10.1.0.27 vs 10.1.0.99"]),
    (dataclasses.replace(FAKE_DEVICE, gpu_name="NVIDIA Other GPU"), ["NVIDIA Fake GPU 80GB", "NVIDIA Other GPU",
                                                                     "specific to the GPU model"]),
])
def test_key_mismatch_is_refused_with_the_reason(device, words):
    comp = C.check_compatible(_meta(), device)
    assert not comp.ok and comp.rebuild
    for w in words:
        assert w in comp.message
    assert "segllm-edge build-engines" in comp.message


def test_other_gpu_of_the_same_architecture_can_be_allowed():
    other = dataclasses.replace(FAKE_DEVICE, gpu_name="NVIDIA Other GPU")
    comp = C.check_compatible(_meta(), other, allow_other_gpu=True)
    assert comp.ok and comp.warnings and "tuned for the other GPU" in comp.warnings[0]
    assert not C.check_compatible(_meta(), dataclasses.replace(other, compute_capability=(8, 0)),
                                  allow_other_gpu=True).ok


def test_stale_onnx_and_precision_are_refused():
    assert C.check_compatible(_meta(), FAKE_DEVICE, onnx_sha256="a" * 64, precision="fp16").ok
    comp = C.check_compatible(_meta(), FAKE_DEVICE, onnx_sha256="c" * 64)
    assert not comp.ok and "another ONNX graph" in comp.message
    comp = C.check_compatible(_meta(), FAKE_DEVICE, precision="bf16")
    assert not comp.ok and "precision is fp16, bf16 was asked for" in comp.message


def _fake_engine_file(folder: Path, onnx_path: Path, graph="llm", device=FAKE_DEVICE, precision="fp16") -> Path:
    key = C.EngineKey.for_device(graph, precision, device, C.file_sha256(onnx_path))
    path = C.engine_path(folder, key)
    path.write_bytes(b"plan")
    C.write_sidecar(path, key, onnx_stamp=C.file_stamp(onnx_path))
    return path


def test_find_engine(tmp_path):
    onnx_path = tmp_path / "llm.onnx"
    onnx_path.write_bytes(b"graph v1")
    eng = tmp_path / "engines"
    with pytest.raises(BackendError, match="no TensorRT engine for graph 'llm'.*build-engines"):
        C.find_engine(eng, "llm", FAKE_DEVICE)
    eng.mkdir()
    good = _fake_engine_file(eng, onnx_path)
    assert C.find_engine(eng, "llm", FAKE_DEVICE, "fp16", onnx_path)[0] == good
    # other machines are refused, naming why
    with pytest.raises(BackendError, match=r"sm_90.*sm_87.*rebuild"):
        C.find_engine(eng, "llm", dataclasses.replace(FAKE_DEVICE, compute_capability=(8, 7)), onnx_path=onnx_path)
    with pytest.raises(BackendError, match="TensorRT 10.1.*TensorRT 10.3"):
        C.find_engine(eng, "llm", dataclasses.replace(FAKE_DEVICE, trt_version="10.3.0"), onnx_path=onnx_path)
    with pytest.raises(BackendError, match="specific to the GPU model"):
        C.find_engine(eng, "llm", dataclasses.replace(FAKE_DEVICE, gpu_name="Orin"), onnx_path=onnx_path)
    # the export was copied (new mtime, same bytes): hashed again, still accepted
    os.utime(onnx_path, ns=(1, 1))
    assert C.find_engine(eng, "llm", FAKE_DEVICE, onnx_path=onnx_path)[0] == good
    # the export changed: refused
    onnx_path.write_bytes(b"graph v2")
    with pytest.raises(BackendError, match="another ONNX graph"):
        C.find_engine(eng, "llm", FAKE_DEVICE, onnx_path=onnx_path)
    # an engine without its sidecar is not silently used
    C.sidecar_path(good).unlink()
    with pytest.raises(BackendError, match="no metadata file"):
        C.find_engine(eng, "llm", FAKE_DEVICE)


# ================================================================================================ plan
def test_plan_build_fp16(golden_export):
    from segllm_edge.export.quantize import FP16_KEEP_FP32_OPS

    plans = {p.graph: p for p in B.plan_build(golden_export, "fp16")}
    assert set(plans) == set(Manifest.load(golden_export).graphs)
    for g in B.DEFAULT_FP32_GRAPHS:     # HIPIE: fp32, TF32 off
        assert plans[g].precision == "fp32" and plans[g].flags == () and not plans[g].fp32_nodes
        assert "TF32 off" in plans[g].notes
    for g in ("vision_encoder", "mask_encoder", "llm", "seg_head"):
        assert plans[g].precision == "fp16" and plans[g].flags == ("FP16",)
        assert not ops.errors(plans[g].issues)
    llm = onnx.load(str(golden_export / "llm.onnx"), load_external_data=False)
    by_name = {n.name: n for n in llm.graph.node}
    pinned = plans["llm"].fp32_nodes
    # every norm / softmax / RoPE op type the onnxruntime fp16 export keeps fp32 is pinned ...
    keep = [n.name for n in llm.graph.node if n.op_type in FP16_KEEP_FP32_OPS]
    assert keep and set(keep) <= pinned
    # ... and so is the rest of each RMSNorm (+eps, x*rsqrt, *weight) and of the RoPE angle computation
    scopes = lambda n: next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")  # noqa
    norm = [n for n in pinned if "input_layernorm" in scopes(by_name[n])]
    assert {by_name[n].op_type for n in norm} >= {"Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul"}
    assert any(by_name[n].op_type == "Mul" and "rotary_emb" in scopes(by_name[n]) for n in pinned)
    assert not any(by_name[n].op_type == "MatMul" and "rotary_emb" not in scopes(by_name[n]) for n in pinned)
    vis = onnx.load(str(golden_export / "vision_encoder.onnx"), load_external_data=False)
    assert {n.name for n in vis.graph.node if n.op_type == "LayerNormalization"} <= plans["vision_encoder"].fp32_nodes


def test_int8_without_qdq_is_refused_for_the_llm(golden_export):
    with pytest.raises(BackendError, match="Model Optimizer") as exc:
        B.plan_build(golden_export, "int8")
    assert "Q/DQ" in str(exc.value) and "llm" in str(exc.value)
    (p,) = B.plan_build(golden_export, "int8", B.BuildOptions(graphs=("vision_encoder",)))
    assert p.precision == "fp16" and "no Q/DQ nodes" in " ".join(p.notes)


def test_plan_build_bad_requests(golden_export, tmp_path):
    with pytest.raises(BackendError, match="unknown TensorRT precision"):
        B.plan_build(golden_export, "int4")
    with pytest.raises(BackendError, match="unknown graph"):
        B.plan_build(golden_export, "fp16", B.BuildOptions(graphs=("nope",)))
    with pytest.raises(BackendError, match="GridSample"):
        B.plan_build(golden_export, "fp16", B.BuildOptions(deform_attn="plugin"))
    with pytest.raises(segllm_edge.CheckpointError, match="manifest.json is missing"):
        B.plan_build(tmp_path, "fp16")


# ================================================================================ no TensorRT / CUDA here
def test_build_engines_without_tensorrt(golden_export, tmp_path, no_tensorrt):
    with pytest.raises(BackendError, match="TensorRT is not installed.*JetPack.*NGC"):
        B.build_engines(golden_export, "fp16", out_dir=tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_build_engines_cli(golden_export, no_tensorrt):
    from segllm_edge.cli import main

    res = CliRunner().invoke(main, ["build-engines", "--export", str(golden_export)])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit)
    assert "TensorRT is not installed" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["build-engines", "--export", str(golden_export), "--check-only"])
    assert res.exit_code == 0, res.output
    for g in Manifest.load(golden_export).graphs:
        assert g in res.output
    assert "graphs and profiles check out" in res.output
    res = CliRunner().invoke(main, ["build-engines", "--export", str(golden_export), "--check-only",
                                    "--precision", "int8"])
    assert res.exit_code != 0 and "Model Optimizer" in res.output and "Traceback" not in res.output


def test_load_tensorrt_backend_without_tensorrt(golden_export, no_tensorrt):
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        segllm_edge.load(golden_export, backend="tensorrt")


def test_load_cuda_backend_without_cuda(golden_export, golden_ckpt, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        segllm_edge.load(golden_export, backend="cuda")
    with pytest.raises(BackendError, match="no CUDA device"):
        segllm_edge.load(golden_ckpt, backend="cuda")
    with pytest.raises(BackendError, match="no CUDA device"):
        segllm_edge.load(golden_ckpt, backend="torch", device="cuda")
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        segllm_edge.load(golden_export, backend="onnxruntime", device="cuda")
    with pytest.raises(BackendError, match="choose one of " + ", ".join(BACKENDS)):
        segllm_edge.load(golden_export, backend="tpu")


def test_optional_packages_are_imported_lazily(golden_export):
    """Without onnxruntime, tensorrt and triton the package imports, and using them says what to install."""
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        for m in ("onnxruntime", "tensorrt", "triton"):
            sys.modules[m] = None
        import segllm_edge
        skip = ("segllm_edge.serving.bls", "segllm_edge.serving.pystub")  # Triton python-backend only
        for info in pkgutil.walk_packages(segllm_edge.__path__, "segllm_edge."):
            if (info.name not in skip and not info.name.startswith("segllm_edge.kernels.")
                    and not info.name.endswith("__main__")):
                importlib.import_module(info.name)
        from segllm_edge.errors import BackendError
        for call in (lambda: segllm_edge.load({str(golden_export)!r}, backend="onnxruntime"),
                     lambda: segllm_edge.load({str(golden_export)!r}, backend="tensorrt"),
                     lambda: __import__("segllm_edge.export.quantize", fromlist=["x"]).to_int8(None)):
            try:
                call()
            except BackendError as exc:
                print("BackendError:", " ".join(str(exc).split()))
            else:
                raise SystemExit("no error")
        bad = [m for m in ("onnxruntime", "tensorrt", "triton") if sys.modules.get(m) is not None]
        assert not bad, bad
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3
    assert "segllm-edge[cpu]" in lines[0] and "segllm-edge[cpu]" in lines[2] and "TensorRT" in lines[1]


# ======================================================================= a stand-in tensorrt module
class _DT:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"DataType.{self.name}"


_NP_TO_TRT = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}


def make_fake_tensorrt(log: list) -> types.ModuleType:
    """Just enough of TensorRT 10's Python API for builder.build_engines and TrtBackend; engines run the
    ONNX graph with onnxruntime on the CPU. ``log`` collects (graph, profile index, input shapes);
    ``trt.streams`` the (graph, stream handle) of every profile switch and execution."""
    import onnxruntime as ort

    import importlib.machinery

    import torch._dynamo  # noqa: F401  (imported lazily by transformers; it probes for tensorrt by name)

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # no origin: nothing to load
    trt.__version__ = FAKE_DEVICE.trt_version
    streams = trt.streams = []
    trt.DataType = types.SimpleNamespace(**{n: _DT(n) for n in ("FLOAT", "HALF", "BF16", "INT32", "INT64", "INT8",
                                                                 "UINT8", "BOOL")})
    trt.float32, trt.float16, trt.bfloat16 = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in ("FP16", "BF16", "INT8", "FP8", "TF32",
                                                              "OBEY_PRECISION_CONSTRAINTS")})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level=2):
            self.level = level

    trt.Logger = Logger
    trt.init_libnvinfer_plugins = lambda logger, ns: True

    # ---- build side
    class Output:
        dtype = trt.float32

    class Layer:
        def __init__(self, node):
            self.name, self.metadata = node.name + "_1", f"[ONNX Layer: {node.name} | extra]"
            self.num_outputs = len(node.output)
            self.precision, self.out_types = None, {}

        def get_output(self, j):
            return Output()

        def set_output_type(self, j, t):
            self.out_types[j] = t

    class Tensor:
        def __init__(self, name):
            self.name, self.dtype = name, trt.float32

    class Network:
        def __init__(self):
            self.layers, self.onnx, self.inputs, self.outputs = [], None, [], []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            m = onnx.load(path, load_external_data=False)
            self.network.onnx = path
            self.network.layers = [Layer(n) for n in m.graph.node]
            self.network.inputs = [Tensor(t.name) for t in m.graph.input]
            self.network.outputs = [Tensor(t.name) for t in m.graph.output]
            return True

    class OptProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class TimingCache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return self.blob + b"+"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache = set(), [], None

        def set_memory_pool_limit(self, pool, n):
            self.workspace = n

        def set_flag(self, f):
            self.flags.add(f)

        def clear_flag(self, f):
            self.flags.discard(f)

        def add_optimization_profile(self, p):
            self.profiles.append(p.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob):
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptProfile()

        def build_serialized_network(self, network, config):
            pinned = [l.metadata for l in network.layers if l.precision == trt.float32]
            types_ = {t.name: t.dtype.name for t in (*network.inputs, *network.outputs) if t.dtype is not trt.float32}
            blob = {"onnx": network.onnx, "profiles": config.profiles, "flags": sorted(config.flags),
                    "pinned": len(pinned), "io_types": types_}
            return json.dumps(blob).encode()

    trt.Builder, trt.OnnxParser = Builder, OnnxParser

    # ---- run side
    class Context:
        def __init__(self, engine):
            self.e, self.profile, self.shapes, self.addr = engine, 0, {}, {}

        def set_optimization_profile_async(self, i, stream):
            assert 0 <= i < max(1, len(self.e.profiles))
            streams.append((self.e.graph, stream))
            self.profile, self.shapes = i, {}
            return True

        def set_input_shape(self, name, shape):
            shape = [int(d) for d in shape]
            spec = self.e.specs[name]
            if len(shape) != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, shape)):
                return False
            if self.e.profiles:  # what TensorRT checks: inside the selected profile's min..max
                lo, _, hi = self.e.profiles[self.profile][name]
                if any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                    return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name):
            if name in self.e.in_names:
                return self.shapes.get(name, [-1])
            vals = {}
            for n, s in self.shapes.items():
                for d, v in zip(self.e.specs[n].shape, s):
                    if isinstance(d, str):
                        vals[d] = v
            if "past" in vals and "seq" in vals:
                vals["total"] = vals["past"] + vals["seq"]
            return [d if isinstance(d, int) else vals.get(d, -1) for d in self.e.specs[name].shape]

        def set_tensor_address(self, name, ptr):
            assert ptr, f"null address for {name}"
            self.addr[name] = ptr
            return True

        def _array(self, name, shape):
            dt = self.e.np_dtype(name)
            if int(np.prod(shape)) == 0:
                return np.zeros(shape, dt)
            raw = (ctypes.c_char * (int(np.prod(shape)) * dt.itemsize)).from_address(self.addr[name])
            return np.frombuffer(raw, dtype=dt).reshape(shape)

        def execute_async_v3(self, stream):
            streams.append((self.e.graph, stream))
            feeds = {n: self._array(n, self.shapes[n]).astype(self.e.specs[n].dtype) for n in self.e.in_names}
            log.append((self.e.graph, self.profile, {n: tuple(v.shape) for n, v in feeds.items()}))
            outs = self.e.sess.run(self.e.out_names, feeds)
            for n, v in zip(self.e.out_names, outs):
                dst = self._array(n, self.get_tensor_shape(n))
                assert dst.shape == v.shape, (n, dst.shape, v.shape)
                dst[...] = v.astype(dst.dtype)
            return True

    class Engine:
        def __init__(self, blob):
            d = json.loads(blob)
            path = Path(d["onnx"])
            man = Manifest.load(path.parent)
            spec = next(g for g in man.graphs.values() if g.file == path.name)
            self.graph, self.profiles, self.io_types = spec.name, d["profiles"], d["io_types"]
            self.specs = {t.name: t for t in (*spec.inputs, *spec.outputs)}
            self.in_names, self.out_names = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
            self.num_optimization_profiles = max(1, len(self.profiles))
            self.device_memory_size_v2 = 0
            self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        @property
        def num_io_tensors(self):
            return len(self.in_names) + len(self.out_names)

        def get_tensor_name(self, i):
            return (self.in_names + self.out_names)[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.in_names else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return getattr(trt.DataType, self.io_types.get(name) or _NP_TO_TRT[self.specs[name].dtype])

        def np_dtype(self, name):
            t = self.get_tensor_dtype(name).name
            return np.dtype({v: k for k, v in _NP_TO_TRT.items()}[t])

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            try:
                return Engine(blob)
            except (ValueError, KeyError):
                return None

    trt.Runtime = Runtime
    return trt


@pytest.fixture(scope="module")
def fake_build(golden_export, tmp_path_factory):
    """Engines built by builder.build_engines with the stand-in TensorRT (max_seg=1 so that a reuse=False
    conversation's mask decoder calls are split; fp32 KV cache I/O for exact parity with onnxruntime),
    plus the log of engine executions."""
    mp = pytest.MonkeyPatch()
    log: list = []
    fake = make_fake_tensorrt(log)
    mp.setitem(sys.modules, "tensorrt", fake)
    mp.setattr(C, "current_device", lambda device_index=0: FAKE_DEVICE)
    out = tmp_path_factory.mktemp("engines")
    lines: list[str] = []
    try:
        built = B.build_engines(golden_export, "fp16", out_dir=out, options=B.BuildOptions(max_seg=1, kv_cache_dtype="fp32"),
                                log=lines.append)
    finally:
        mp.undo()
    return types.SimpleNamespace(trt=fake, out=out, built=built, lines=lines, log=log, export=golden_export)


def _backend(fb, device=FAKE_DEVICE, **kw):
    from segllm_edge.runtime.trt_backend import TrtBackend

    return TrtBackend._from_engines(fb.trt, fb.export, fb.out, device, torch.device("cpu"), **kw)


def test_fake_build_writes_keyed_engines_and_the_bos_prefix(fake_build):
    fb = fake_build
    man = Manifest.load(fb.export)
    assert set(fb.built) == set(man.graphs)
    for g, path in fb.built.items():
        meta = C.read_sidecar(path)
        assert meta["graph"] == g and meta["gpu_name"] == FAKE_DEVICE.gpu_name and meta["trt_version"] == "10.1.0.27"
        assert meta["onnx_sha256"] == C.file_sha256(fb.export / man.graphs[g].file)
        blob = json.loads(path.read_bytes())
        # the engine's profiles are the sidecar's, in the same order (TrtBackend relies on it)
        prof = P.profiles_from_json({g: meta["profiles"]})[g]
        if any(t.dynamic_axes for t in man.graphs[g].inputs):
            assert len(blob["profiles"]) == len(prof)
            for shapes, p in zip(blob["profiles"], prof):
                assert shapes == {k: [list(x) for x in v] for k, v in P.input_shapes(man.graphs[g], p).items()}
        else:
            assert blob["profiles"] == []
        if meta["precision"] == "fp32":
            assert "FP16" not in blob["flags"] and "TF32" not in blob["flags"]
        else:
            assert "FP16" in blob["flags"]
    assert C.read_sidecar(fb.built["llm"])["fp32_layers_pinned"] > 0
    assert C.read_sidecar(fb.built["mask_decoder"])["profiles"][0]["axes"]["n"]["max"] == 1   # max_seg=1
    bos = np.load(fb.out / B.BOS_PREFIX_FILE)
    assert str(bos["onnx_sha256"]) == C.file_sha256(fb.export / "llm.onnx")
    assert list(fb.out.glob("timing.*.cache"))


def test_fake_build_reuses_cached_engines(fake_build, monkeypatch):
    fb = fake_build
    monkeypatch.setitem(sys.modules, "tensorrt", fb.trt)
    monkeypatch.setattr(C, "current_device", lambda device_index=0: FAKE_DEVICE)
    lines: list[str] = []
    again = B.build_engines(fb.export, "fp16", out_dir=fb.out, options=B.BuildOptions(max_seg=1, kv_cache_dtype="fp32"), log=lines.append)
    assert again == fb.built and len(lines) == len(again) and all(" cached " in ln for ln in lines)
    # other profile limits are another engine (the profiles are part of the key)
    lines.clear()
    other = B.build_engines(fb.export, "fp16", out_dir=fb.out, options=B.BuildOptions(max_seg=1, max_masks=4,
                            kv_cache_dtype="fp32", graphs=("mask_encoder",)), log=lines.append)
    assert other["mask_encoder"] != fb.built["mask_encoder"] and "building" in lines[0]
    other["mask_encoder"].unlink()
    C.sidecar_path(other["mask_encoder"]).unlink()


def test_publish_for_triton_links_all_but_the_bos_prefix_llm(fake_build, tmp_path):
    export = tmp_path / "exp"
    export.mkdir()
    linked = B.publish_for_triton(export, fake_build.built, log=lambda *_: None)
    assert set(linked) == set(fake_build.built) - {"llm"}
    for g, link in linked.items():
        assert link == export / "tensorrt" / f"{g}.plan" and link.read_bytes() == fake_build.built[g].read_bytes()


@pytest.fixture(scope="module")
def ort_model(golden_export):
    return segllm_edge.load(golden_export, backend="onnxruntime")


def _conversation(model_or_backend, image, reuse, n=3):
    from segllm_edge.api import SegLLM

    model = model_or_backend if isinstance(model_or_backend, SegLLM) else SegLLM(model_or_backend)
    s = model.session(image, reuse=reuse, trace=True)
    return s, [s.ask(q) for q in GOLDEN_QUESTIONS[:n]]


def test_every_engine_runs_on_the_backends_own_stream(fake_build, golden_image):
    """Not the legacy default stream (handle 0: TensorRT adds a sync around every enqueueV3): every profile switch
    and execution of a conversation gets the stream the backend was given (on CUDA one it creates itself). A
    stand-in stream object here: without a GPU nothing checks the CUDA ordering itself."""
    be = _backend(fake_build)
    assert be.stream is None                          # on the CPU stand-in device
    be.use_stream(types.SimpleNamespace(cuda_stream=0x5EED))
    fake_build.trt.streams.clear()
    _conversation(be, golden_image, True, 2)
    graphs = {g for g, _ in fake_build.trt.streams}
    assert {"vision_encoder", "llm", "seg_head", "mask_decoder", "mask_encoder"} <= graphs, graphs
    assert {h for _, h in fake_build.trt.streams} == {0x5EED}


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no_reuse"])
def test_trt_backend_matches_onnxruntime(fake_build, ort_model, golden_image, reuse):
    be = _backend(fake_build)
    assert be.name == "tensorrt" and be.precision == "fp16" and not be.empty_past_ok
    fake_build.log.clear()
    n = 3 if reuse else 2     # reuse=False recomputes everything each round: two rounds cover it
    s_trt, got = _conversation(be, golden_image, reuse, n)
    s_ort, ref = _conversation(ort_model, golden_image, reuse, n)
    for a, b in zip(got, ref):
        # token accounting identical to onnxruntime: the BOS token is in the cache and counted once
        assert (a.context_tokens, a.new_tokens, a.memory["kv_cache"]) == (b.context_tokens, b.new_tokens,
                                                                          b.memory["kv_cache"])
        h, hr = np.asarray(a.trace["hidden"]), np.asarray(b.trace["hidden"])  # the session's arrays are numpy
        assert h.shape == hr.shape
        assert np.abs(h - hr).max() <= 1e-4 * max(1.0, np.abs(hr).max())
        for k in ("pred_masks", "pred_logits"):
            # relative to the tensor's scale: the exported mask decoder (fast-v2 sampling) sums in another order
            # than the stand-in's graph, ~6e-3 on logits of magnitude ~700 (1e-5 of the scale)
            x, y = np.asarray(a.trace["raw"][k]), np.asarray(b.trace["raw"][k])
            assert np.abs(x - y).max() <= 1e-4 * max(1.0, np.abs(y).max()), k
        from segllm_edge.pipeline.masks import mask_iou

        assert a.query_index == b.query_index and mask_iou(a.mask, b.mask) >= 0.999   # border pixels may flip
    if reuse:
        assert s_trt._cache.length == s_ort._cache.length == s_trt.context_length
        assert s_trt.kv_cache_bytes() == s_ort.kv_cache_bytes()
        assert s_trt._cache.grow_count == 1    # one allocation for the whole conversation
        for mine, theirs in zip(s_trt._cache.views(), s_ort._cache.arrays):
            assert np.allclose(mine.numpy(), theirs, rtol=1e-4, atol=1e-5)
    llm_calls = [c for c in fake_build.log if c[0] == "llm"]
    # never a zero-length KV cache; round 1 starts on the BOS prefix (past 1, seq = round tokens - 1)
    assert all(c[2]["past_key_values.0.key"][2] >= 1 for c in llm_calls)
    assert llm_calls[0][2]["past_key_values.0.key"][2] == 1
    assert llm_calls[0][2]["inputs_embeds"][1] == got[0].new_tokens - 1
    dec = [c for c in fake_build.log if c[0] == "mask_decoder"]
    assert all(c[2]["conditioning"][0] == 1 for c in dec)   # max_seg=1: no_reuse's 2 and 3 <seg> rows split
    if not reuse:
        assert len(dec) == 1 + 2


def test_trt_backend_chunked_prefill_and_crop(fake_build, ort_model):
    be = _backend(fake_build)
    H = be.info.hidden_size
    ids = torch.tensor([be.tokenizer.bos_id] + list(range(5, 5 + 40)))
    emb = be.embed_tokens(ids)[None]
    ref_cache = ort_model.backend.new_cache()
    ref = torch.from_numpy(ort_model.backend.llm(emb, ref_cache))   # onnxruntime's backend returns numpy
    # profiles that allow only 16 new tokens per call: the prefill is split, the result is the same
    llm = be.engines["llm"]
    llm.profiles = [P.Profile("small", {"batch": P.AxisRange(1, 1, 1), "seq": P.AxisRange(1, 8, 16),
                                        "past": P.AxisRange(1, 1, be.info.max_context - 1)})] * len(llm.profiles)
    fake_build.log.clear()
    cache = be.new_cache()
    out = be.llm(emb, cache)
    seqs = [c[2]["inputs_embeds"][1] for c in fake_build.log if c[0] == "llm"]
    assert seqs == [16, 16, 8] and out.shape == (1, 41, H)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert cache.length == ref_cache.length == 41 and cache.nbytes() == ref_cache.nbytes()
    # crop (a failed round is undone) keeps the first tokens, densely laid out
    cache.crop(20)
    ref_cache.crop(20)
    assert cache.length == 20
    for mine, theirs in zip(cache.views(), ref_cache.arrays):
        assert mine.shape == theirs.shape and np.allclose(mine.numpy(), theirs, rtol=1e-4, atol=1e-5)
    # and the conversation goes on from there like onnxruntime's
    more = be.embed_tokens(torch.arange(7, 12))[None]
    assert torch.allclose(be.llm(more, cache), torch.from_numpy(ort_model.backend.llm(more, ref_cache)), rtol=1e-4,
                          atol=1e-5)
    # a first call that does not start with BOS cannot use the BOS prefix
    with pytest.raises(BackendError, match="BOS"):
        be.llm(more, be.new_cache())


def test_trt_backend_fp16_kv_cache(fake_build, ort_model, tmp_path, monkeypatch):
    """The default build stores the llm's KV cache I/O at the engine precision: half the bytes, same tokens."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_build.trt)
    monkeypatch.setattr(C, "current_device", lambda device_index=0: FAKE_DEVICE)
    eng = tmp_path / "engines"
    (plan,) = B.plan_build(fake_build.export, "fp16", B.BuildOptions(graphs=("llm",)))
    assert plan.kv_dtype == "HALF" and "KV cache I/O fp16" in plan.notes
    built = B.build_engines(fake_build.export, "fp16", out_dir=eng, options=B.BuildOptions(graphs=("llm",)),
                            log=lambda *_: None)
    assert C.read_sidecar(built["llm"])["kv_dtype"] == "HALF"
    for g, path in fake_build.built.items():
        if g != "llm":
            for f in (path, C.sidecar_path(path)):
                os.symlink(f, eng / f.name)
    be = _backend(types.SimpleNamespace(trt=fake_build.trt, export=fake_build.export, out=eng))
    ids = torch.tensor([be.tokenizer.bos_id] + list(range(5, 45)))
    emb = be.embed_tokens(ids)[None]
    cache, ref_cache = be.new_cache(), ort_model.backend.new_cache()
    out, ref = be.llm(emb, cache), torch.from_numpy(ort_model.backend.llm(emb, ref_cache))
    assert cache.views()[0].dtype == torch.float16
    assert cache.length == ref_cache.length and 2 * cache.nbytes() == ref_cache.nbytes()
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()
    for mine, theirs in zip(cache.views(), ref_cache.arrays):
        assert np.allclose(mine.float().numpy(), theirs, rtol=1e-2, atol=1e-3)


def test_trt_kv_cache_grows_by_doubling():
    from segllm_edge.runtime.trt_backend import TrtKVCache

    c = TrtKVCache(2, 4, 8, torch.float32, "cpu", max_tokens=2048, block=256)
    assert c.length == 0 and c.allocated_bytes() == 0
    c.reserve(300)
    assert c.capacity == 512 and c.grow_count == 1
    kv = [torch.randn(1, 4, 300, 8) for _ in range(4)]
    for dst, src in zip(c.next_views(300), kv):
        dst.copy_(src)
    c.commit(300)
    c.reserve(400)
    assert c.grow_count == 1                      # still fits
    c.reserve(600)
    assert c.capacity == 1024 and c.grow_count == 2
    for got, want in zip(c.views(), kv):          # the data survived the move
        assert torch.equal(got, want)
    c.reserve(2048)
    assert c.capacity == 2048
    assert c.allocated_bytes() == 2 * 4 * 4 * 2048 * 8 * 4
    assert c.nbytes() == 4 * 4 * 300 * 8 * 4


def test_trt_backend_refuses_engines_for_another_machine(fake_build):
    with pytest.raises(BackendError, match=r"sm_90.*sm_87.*build-engines"):
        _backend(fake_build, dataclasses.replace(FAKE_DEVICE, compute_capability=(8, 7)))
    with pytest.raises(BackendError, match="TensorRT 10.1.*TensorRT 10.3"):
        _backend(fake_build, dataclasses.replace(FAKE_DEVICE, trt_version="10.3.0"))
    other = dataclasses.replace(FAKE_DEVICE, gpu_name="NVIDIA Other GPU")
    with pytest.raises(BackendError, match="specific to the GPU model"):
        _backend(fake_build, other)
    with pytest.warns(UserWarning, match="tuned for the other GPU"):
        _backend(fake_build, other, allow_other_gpu=True)
    with pytest.raises(BackendError, match="precision is fp16, bf16 was asked for"):
        _backend(fake_build, precision="bf16")


def test_trt_backend_refuses_a_stale_bos_prefix(fake_build, tmp_path):
    from segllm_edge.runtime.trt_backend import TrtBackend

    eng = tmp_path / "engines"
    eng.mkdir()
    for f in fake_build.out.iterdir():
        if f.name != B.BOS_PREFIX_FILE:
            os.symlink(f, eng / f.name)
    with pytest.raises(BackendError, match="llm_bos_prefix.npz is missing"):
        TrtBackend._from_engines(fake_build.trt, fake_build.export, eng, FAKE_DEVICE, torch.device("cpu"))
    with np.load(fake_build.out / B.BOS_PREFIX_FILE) as z:
        d = {k: z[k] for k in z.files}
    d["onnx_sha256"] = np.array("0" * 64)
    np.savez(eng / B.BOS_PREFIX_FILE, **d)
    with pytest.raises(BackendError, match="another llm graph"):
        TrtBackend._from_engines(fake_build.trt, fake_build.export, eng, FAKE_DEVICE, torch.device("cpu"))
