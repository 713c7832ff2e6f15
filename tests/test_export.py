"""ONNX export: every graph vs its PyTorch module, the onnxruntime backend end to end vs the research code,
quantized graphs, and clear errors for bad export folders. The golden checkpoint is exported once."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import segllm_edge
from conftest import GOLDEN_QUESTIONS
from segllm_edge import CheckpointError
from segllm_edge.export.graphs import GRAPH_MODULES, flatten_inputs
from segllm_edge.contracts.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest
from segllm_edge.export.onnx_export import export_model
from segllm_edge.export.quantize import to_fp16, to_int4, to_int8


@pytest.fixture(scope="module")
def torch_model(golden_model):
    return golden_model.backend.model


def _inputs(name, info, g):
    """Fresh random inputs with sizes other than the export's examples (dynamic axes really dynamic)."""
    H, S = info.hidden_size, info.clip_image_size
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "vision_encoder":
        return (r(1, 3, S, S),)
    if name == "mask_encoder":
        return (r(2, 3, S, S), torch.rand(2, 4, generator=g))
    if name == "llm":
        return (r(1, 9, H), tuple((r(1, info.num_kv_heads, 13, info.head_dim), r(1, info.num_kv_heads, 13, info.head_dim))
                                  for _ in range(info.num_layers)))
    if name == "seg_head":
        return (r(1, H),)
    if name == "mask_backbone":
        return (r(1, 3, 1024, 1024),)
    if name == "mask_decoder":
        from segllm_edge.contracts.manifest import HIPIE_LEVELS
        return (*[r(1, 256, h, w) for h, w in HIPIE_LEVELS], r(1, 8, 768) * 0.5)
    raise KeyError(name)


def max_rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("name", list(GRAPH_MODULES))
def test_graph_matches_pytorch(golden_export, torch_model, golden_model, name):
    man = Manifest.load(golden_export)
    spec = man.graphs[name]
    args = _inputs(name, golden_model.info, torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = GRAPH_MODULES[name](torch_model).eval()(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    sess = ort.InferenceSession(str(golden_export / spec.file), providers=["CPUExecutionProvider"])
    feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, flatten_inputs(name, args))}
    got = sess.run(None, feeds)
    assert [o.name for o in sess.get_outputs()] == [t.name for t in spec.outputs]
    errs = [max_rel(g, r.numpy()) for g, r in zip(got, ref)]
    print(f"{name}: max rel err {max(errs):.2e}")
    assert max(errs) <= 1e-4, errs


def test_llm_prefill_then_cached_step_equals_one_prefill(golden_export, golden_model):
    be = segllm_edge.load(golden_export, backend="onnxruntime").backend
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, 12, golden_model.info.hidden_size, generator=g).numpy()  # the runtime speaks numpy
    full = be.llm(emb, None)
    cache = be.new_cache()
    a = be.llm(emb[:, :8], cache)
    b = be.llm(emb[:, 8:], cache)
    assert cache.length == 12
    assert max_rel(np.concatenate([a, b], 1), full) < 1e-5
    with torch.no_grad():
        ref = golden_model.backend.llm(emb, None)
    assert max_rel(full, ref.numpy()) < 1e-4
    cache.crop(8)
    assert cache.length == 8 and max_rel(be.llm(emb[:, 8:], cache), b) < 1e-6


def test_export_is_self_contained_and_checked(golden_export):
    man = Manifest.load(golden_export)
    assert set(man.graphs) == {"vision_encoder", "mask_encoder", "llm", "seg_head", "mask_backbone", "mask_decoder"}
    for g in man.graphs.values():
        m = onnx.load(str(golden_export / g.file), load_external_data=False)
        assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert (golden_export / "tokenizer" / "tokenizer.json").exists()
    assert man.extra["graphs"]["llm"]["exporter"].startswith("torch.onnx dynamo")


def test_onnxruntime_end_to_end_matches_research_code(golden_export, golden_image, golden_rounds):
    from test_fidelity import iou

    model = segllm_edge.load(golden_export, backend="onnxruntime")
    s = model.session(golden_image)
    for r, q in enumerate(GOLDEN_QUESTIONS, 1):
        res = s.ask(q)
        assert iou(res.model_mask, golden_rounds[r]["final_mask"]) >= 0.999
        assert res.query_index == int(golden_rounds[r]["selected_fg_query_id_last"])
    assert s._cache.length == len(golden_rounds[3]["input_ids"])


@pytest.mark.parametrize("convert,tol", [(to_fp16, 2e-2), (to_int8, 0.1), (to_int4, 0.15)])
def test_quantized_llm_stays_close(golden_export, tmp_path, convert, tol):
    man = Manifest.load(golden_export)
    spec = man.graphs["llm"]
    p = tmp_path / "llm.onnx"
    shutil.copyfile(golden_export / spec.file, p)
    convert(p)
    ops = {n.op_type for n in onnx.load(str(p)).graph.node}
    if convert is to_int4:
        assert "MatMulNBits" in ops
    if convert is to_int8:
        assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    g = torch.Generator().manual_seed(5)
    info = segllm_edge.load(golden_export, backend="onnxruntime").info
    feeds = {t.name: (torch.randn(*[5 if isinstance(d, str) and d == "seq" else 4 if isinstance(d, str) and d == "past"
                                    else 1 if isinstance(d, str) else d for d in t.shape], generator=g)).numpy()
             for t in spec.inputs}
    ref = ort.InferenceSession(str(golden_export / spec.file)).run(None, feeds)[0]
    got = ort.InferenceSession(str(p)).run(None, feeds)[0]
    assert got.dtype == np.float32
    assert max_rel(got, ref) < tol


def test_non_empty_out_dir_needs_force(golden_ckpt, tmp_path):
    (tmp_path / "x").write_text("keep")
    with pytest.raises(CheckpointError, match="not empty.*--force"):
        export_model(golden_ckpt, tmp_path, progress=False)


def test_checkpoint_that_does_not_load(tmp_path):
    (tmp_path / "nock").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        export_model(tmp_path / "nock", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _copy_export(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_graph_is_named(golden_export, tmp_path):
    d = _copy_export(golden_export, tmp_path / "e")
    (d / "seg_head.onnx").unlink()
    with pytest.raises(CheckpointError, match="missing seg_head.onnx"):
        segllm_edge.load(d, backend="onnxruntime")


def test_corrupt_graph_is_named(golden_export, tmp_path):
    d = _copy_export(golden_export, tmp_path / "e")
    (d / "seg_head.onnx").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load graph seg_head"):
        segllm_edge.load(d, backend="onnxruntime")


def test_manifest_from_another_version(golden_export, tmp_path):
    d = _copy_export(golden_export, tmp_path / "e")
    m = json.loads((d / MANIFEST_NAME).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        segllm_edge.load(d, backend="onnxruntime")


def test_manifest_round_trip(golden_export, tmp_path):
    m = Manifest.load(golden_export)
    m.save(tmp_path)
    assert Manifest.load(tmp_path).to_dict() == m.to_dict()
