"""The streaming exporter (weights read one tensor at a time, graphs traced on the meta device) and
`segllm-edge export`'s exit status on a failed accuracy guard. Golden-size only; the HIPIE graphs (fp32 at every
precision) are linked from the shared fp32 export instead of exported again."""
import functools
import json
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from segllm_edge.contracts.manifest import Manifest, build_manifest
from segllm_edge.export.onnx_export import export_streamed_graph
from segllm_edge.export.quantize import to_int4, to_int8
from segllm_edge.modeling.loader import load_checkpoint


def _feeds(spec, kv_dtype=np.float32, seed=5):
    g = torch.Generator().manual_seed(seed)
    size = {"seq": 5, "past": 4}
    return {t.name: torch.randn(*[size.get(d, 1) if isinstance(d, str) else d for d in t.shape], generator=g)
            .numpy().astype(kv_dtype if t.name.startswith("past_key_values.") else np.float32)
            for t in spec.inputs}


@pytest.fixture(scope="module")
def lazy_golden(golden_ckpt):
    return load_checkpoint(golden_ckpt, lazy=True)


def test_lazy_load_keeps_the_model_off_memory(lazy_golden, golden_state_dict):
    model, weights = lazy_golden.model, lazy_golden.weights
    assert all(p.is_meta for n, p in model.named_parameters() if not n.startswith("hipie."))
    assert not any(p.is_meta for p in model.hipie.parameters())
    key = "llm.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(weights.get(key), golden_state_dict["model.layers.0.mlp.up_proj.weight"])
    assert weights.get(key, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("precision,reference", [("int4", to_int4), ("int8", to_int8)])
def test_streamed_quantized_llm_is_onnxruntimes_quantizer(lazy_golden, golden_export, tmp_path, precision, reference):
    """Quantizing each weight as it streams gives onnxruntime's own quantizer's graph outputs, bit for bit."""
    spec = Manifest.load(golden_export).graphs["llm"]
    ours = tmp_path / "llm.onnx"
    notes = export_streamed_graph(lazy_golden, "llm", spec, ours, precision)
    assert notes["quantized_matmuls"] == 7 * lazy_golden.info.num_layers
    theirs = tmp_path / "ref" / "llm.onnx"
    theirs.parent.mkdir()
    theirs.write_bytes((golden_export / spec.file).read_bytes())
    reference(theirs)
    feeds = _feeds(spec)
    a = ort.InferenceSession(str(ours)).run(None, feeds)
    b = ort.InferenceSession(str(theirs)).run(None, feeds)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_fp16_llm_from_a_bf16_checkpoint_has_an_fp16_kv_cache(golden_export, tmp_path):
    """A bf16 checkpoint (as released) exported at fp16 without an fp32 model: fp16 KV cache, fp32 embeddings in
    and hidden states out, close to the fp32 graph."""
    import segllm_edge.tiny as tiny

    ck = tmp_path / "bf16"
    entries = json.loads((tiny_golden_keys()).read_text())["keys"]
    tiny.make_tiny_checkpoint(ck, entries=entries, dtype="bf16")
    (ck / "config.json").write_text((tiny_golden_keys().parent / "golden_config.json").read_text())
    loaded = load_checkpoint(ck, dtype=torch.float16, lazy=True)
    assert next(iter(loaded.weights.infos.values())).dtype == torch.bfloat16
    man = build_manifest(loaded.info)
    from segllm_edge.export.quantize import _retype_kv

    _retype_kv(man, "float16")
    p = tmp_path / "llm.onnx"
    export_streamed_graph(loaded, "llm", man.graphs["llm"], p, "fp16")
    sess = ort.InferenceSession(str(p))
    types = {t.name: t.type for t in (*sess.get_inputs(), *sess.get_outputs())}
    assert types["inputs_embeds"] == types["hidden_states"] == "tensor(float)"
    assert types["past_key_values.0.key"] == types["present.0.value"] == "tensor(float16)"
    spec = Manifest.load(golden_export).graphs["llm"]
    feeds = _feeds(spec)
    ref = ort.InferenceSession(str(golden_export / spec.file)).run(None, feeds)
    got = sess.run(None, {k: v.astype(np.float16) if k.startswith("past_") else v for k, v in feeds.items()})
    assert got[1].dtype == np.float16
    assert float(np.abs(got[0] - ref[0]).max() / np.abs(ref[0]).max()) < 3e-2  # bf16 weights, fp16 compute
    assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044


def tiny_golden_keys():
    from conftest import GOLDEN

    return GOLDEN / "state_dict_keys.json"


def test_export_cli_exits_1_on_a_failed_guard_and_0_when_allowed(golden_ckpt, golden_export, golden_image,
                                                                 tmp_path, monkeypatch):
    """A real int4 export and drift report (one round); the guard's threshold is raised above any IoU so it fails."""
    import segllm_edge
    from segllm_edge.cli import main
    from segllm_edge.export import drift, onnx_export, reference

    real_export, real_probe = onnx_export.export_model, segllm_edge.drift_probe
    monkeypatch.setattr(onnx_export, "export_model", lambda *a, **k: real_export(
        *a, **{**k, "fp32_graphs_from": k.get("fp32_graphs_from") or golden_export}))
    monkeypatch.setattr(segllm_edge, "drift_probe", lambda: real_probe(golden_image, ("Segment the red circle.",)))
    monkeypatch.setattr(reference, "guard", functools.partial(drift.guard, min_iou=1.01))
    out = tmp_path / "int4"
    args = ["export", "--checkpoint", str(golden_ckpt), "--out", str(out), "--precision", "int4"]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 1, failed.output
    assert "failed its accuracy guard" in failed.output and "--allow-accuracy-drop" in failed.output
    report = json.loads((out / "drift_report.json").read_text())
    assert report["guard"]["passed"] is False and report["rounds"][0]["compared"]
    assert Manifest.load(out).precision == "int4"  # the export is written all the same
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(out / "llm.onnx")).graph.node}
    allowed = CliRunner().invoke(main, args + ["--force", "--allow-accuracy-drop"])
    assert allowed.exit_code == 0, allowed.output
    assert "FAILED" in allowed.output and "export written to" in allowed.output
    assert not list(tmp_path.glob(".fp32-reference-*"))  # the temporary reference export is gone


@pytest.fixture(scope="module")
def bf16_folder(golden_export, lazy_golden, tmp_path_factory):
    """The golden export with its llm and seg_head graphs exported bf16 (streamed), the manifest retyped."""
    import os

    from segllm_edge.export.quantize import _retype_kv

    folder = tmp_path_factory.mktemp("bf16")
    man = Manifest.load(golden_export)
    for f in golden_export.iterdir():  # graphs linked; the manifest is written anew (a link would edit the fixture's)
        if f.is_file() and f.name not in ("seg_head.onnx", "llm.onnx", "manifest.json"):
            os.link(f, folder / f.name)
    (folder / man.tokenizer_dir).symlink_to(golden_export / man.tokenizer_dir)
    _retype_kv(man, "bfloat16")
    man.precision = "bf16"
    man.save(folder)
    for name in ("seg_head", "llm"):
        export_streamed_graph(lazy_golden, name, man.graphs[name], folder / f"{name}.onnx", "bf16")
    return folder


def test_bf16_export_runs_on_openvino_and_onnxruntime_cpu_says_it_cannot(bf16_folder, golden_export):
    from segllm_edge.contracts.export_folder import open_export
    from segllm_edge.errors import BackendError
    from segllm_edge.runtime.openvino_backend import OpenVinoSession, require_openvino
    from segllm_edge.runtime.ort_backend import OrtBackend

    with pytest.raises(BackendError, match="bf16 export: onnxruntime's CPU provider has no bf16 kernels"):
        OrtBackend.from_export(bf16_folder)
    ov = require_openvino()
    sess = OpenVinoSession(ov.Core(), bf16_folder / "llm.onnx", "f32", 2)
    backend = OrtBackend(open_export(bf16_folder), None, {"llm": sess}, None)  # only the llm graph is needed
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 7, lazy_hidden(bf16_folder)), dtype=np.float32)
    full = backend.llm(emb, None)
    cache = backend.new_cache()
    parts = [backend.llm(emb[:, :5], cache), backend.llm(emb[:, 5:], cache)]
    assert cache.length == 7 and all(a.dtype.name == "bfloat16" for a in cache.arrays)
    assert float(np.abs(np.concatenate(parts, 1) - full).max() / np.abs(full).max()) < 2e-2
    spec = Manifest.load(golden_export).graphs["llm"]
    empty = {t.name: np.zeros((1, *t.shape[1:2], 0, t.shape[3]), np.float32) for t in spec.inputs[1:]}
    ref = ort.InferenceSession(str(golden_export / spec.file)).run(None, {"inputs_embeds": emb, **empty})[0]
    assert float(np.abs(full - ref).max() / np.abs(ref).max()) < 5e-2  # bf16 weights and compute


def lazy_hidden(folder):
    return Manifest.load(folder).model["hidden_size"]


def test_tensorrt11_builds_a_bf16_export_strongly_typed(bf16_folder, tmp_path, monkeypatch):
    """A bf16 export's graph carries its types: TensorRT 11 (the stand-in) parses it as is, no precision flags;
    a bf16 graph is refused for an fp16 engine."""
    import sys

    from segllm_edge.contracts import engines as C
    from segllm_edge.errors import BackendError
    from segllm_edge.export.tensorrt import builder as B
    from test_tensorrt_generations import TRT11, fake_trt11

    typed = onnx.load(str(bf16_folder / "seg_head.onnx"))
    assert {t.data_type for t in typed.graph.initializer if len(t.dims) >= 2} == {onnx.TensorProto.BFLOAT16}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt11([]))
    monkeypatch.setattr(C, "current_device", lambda device_index=0: TRT11)
    built = B.build_engines(bf16_folder, "bf16", out_dir=tmp_path / "engines", log=lambda *_: None,
                            options=B.BuildOptions(graphs=("seg_head",)))
    blob = json.loads(built["seg_head"].read_bytes())
    assert blob["onnx"] == str(bf16_folder / "seg_head.onnx") and blob["flags"] == []
    assert C.read_sidecar(built["seg_head"])["typing"] == "strong"
    with pytest.raises(BackendError, match="needs a fp16 ONNX graph, and seg_head.onnx is bf16"):
        B.build_engines(bf16_folder, "fp16", out_dir=tmp_path / "engines16", log=lambda *_: None,
                        options=B.BuildOptions(graphs=("seg_head",)))


def test_bos_prefix_of_a_bf16_export(bf16_folder, golden_export, tmp_path):
    """build-engines writes the BOS prefix before building; onnxruntime's CPU provider cannot run a bf16 llm
    graph, so it runs an fp32-compute companion of it (same bf16 weights, cast where read): the prefix equals the
    fp32 export's up to bf16 rounding, and the companion is gone afterwards."""
    from segllm_edge.export.tensorrt.bos_prefix import fp32_compute_graph, has_bf16, write_bos_prefix

    proto = onnx.load(str(bf16_folder / "llm.onnx"), load_external_data=False)
    companion = fp32_compute_graph(proto).graph
    bf16 = {t.name for t in companion.initializer if t.data_type == onnx.TensorProto.BFLOAT16}
    assert bf16 and has_bf16(proto)                                     # the weights stay bf16; proto unchanged
    assert all(n.op_type == "Cast" for n in companion.node if set(n.input) & bf16)   # read through a cast only
    assert not any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
                   for v in (*companion.input, *companion.output, *companion.value_info))
    ref = np.load(write_bos_prefix(golden_export, tmp_path / "fp32.npz"))
    got = np.load(write_bos_prefix(bf16_folder, tmp_path / "bf16.npz"))
    assert set(got.files) == set(ref.files) and int(got["bos_id"]) == int(ref["bos_id"])
    assert str(got["onnx_sha256"]) != str(ref["onnx_sha256"])          # keyed to the bf16 graph
    for k in ref.files:
        if k.startswith("present.") or k == "hidden_states":
            a, b = ref[k], got[k]
            assert a.shape == b.shape and b.dtype == np.float32, k
            assert float(np.abs(a - b).max() / np.abs(a).max()) < 5e-2, k   # bf16 weights
    assert not [p for p in bf16_folder.iterdir() if "bos-fp32" in p.name]
