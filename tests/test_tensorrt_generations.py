"""TensorRT 10 (weak typing: precision flags, per-layer constraints; JetPack) and TensorRT 11 (strongly typed
networks only), version checks, ``build-engines --print-trtexec`` and ``--check-only`` with TensorRT's own
parser check. Driven by the stand-in ``tensorrt`` module of test_tensorrt.py, turned into a TensorRT 11 one
here by removing the weak-typing API (it is not TensorRT; nothing here says a real one builds these graphs)."""
from __future__ import annotations

import dataclasses
import json
import sys
import types

import onnx
import pytest
from click.testing import CliRunner

from segllm_edge.cli import main
from segllm_edge.errors import BackendError
from segllm_edge.export.tensorrt import builder as B
from segllm_edge.contracts import engines as C
from segllm_edge.contracts.engines import STRONG, WEAK, api_generation, require_tensorrt
from test_tensorrt import FAKE_DEVICE, make_fake_tensorrt

TRT11 = dataclasses.replace(FAKE_DEVICE, trt_version="11.0.0.7")


def fake_trt11(log: list) -> types.ModuleType:
    """The stand-in without what TensorRT 11 removed: precision builder flags, OBEY_PRECISION_CONSTRAINTS,
    layer.precision / set_output_type; create_network refuses a network that is not strongly typed."""
    trt = make_fake_tensorrt(log)
    trt.__version__ = TRT11.trt_version
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32")
    weak_builder, weak_parser = trt.Builder, trt.OnnxParser

    class Builder(weak_builder):
        def create_network(self, flags=0):
            if not flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)):
                raise TypeError("TensorRT 11 builds strongly typed networks only")
            return super().create_network(flags)

    class StrictLayer:
        def __init__(self, layer):
            self.__dict__["_l"] = layer

        def __getattr__(self, k):
            return getattr(self._l, k)

        def __setattr__(self, k, v):
            if k == "precision":
                raise AttributeError("ILayer.precision was removed in TensorRT 11")
            setattr(self._l, k, v)

        def set_output_type(self, j, t):
            raise AttributeError("ILayer.set_output_type was removed in TensorRT 11")

    class OnnxParser(weak_parser):
        def parse_from_file(self, path):
            ok = super().parse_from_file(path)
            self.network.layers = [StrictLayer(layer) for layer in self.network.layers]
            return ok

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


def test_versions_are_detected_and_checked(monkeypatch):
    assert api_generation("10.3.0.26") == WEAK and api_generation("11.0.0.7") == STRONG
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(BackendError, match="TensorRT 8.6 is too old.*TensorRT 10 or later"):
        require_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="garbage"))
    with pytest.raises(BackendError, match="cannot read the TensorRT version"):
        require_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0.26"))
    assert require_tensorrt().__version__ == "10.3.0.26"


@pytest.mark.parametrize("generation", ["10", "11"])
def test_build_follows_the_api_generation(golden_export, tmp_path, monkeypatch, generation):
    trt = fake_trt11([]) if generation == "11" else make_fake_tensorrt([])
    device = TRT11 if generation == "11" else FAKE_DEVICE
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(C, "current_device", lambda device_index=0: device)
    built = B.build_engines(golden_export, "fp16", out_dir=tmp_path, log=lambda *_: None,
                            options=B.BuildOptions(graphs=("llm", "seg_head")))
    assert set(built) == {"llm", "seg_head"}
    for graph, engine in built.items():
        blob, meta = json.loads(engine.read_bytes()), C.read_sidecar(engine)
        if generation == "10":  # flags + pinned fp32 layers on the export's own (fp32) graph
            assert "FP16" in blob["flags"]
            if graph == "llm":  # norms and RoPE pinned to fp32
                assert "OBEY_PRECISION_CONSTRAINTS" in blob["flags"] and blob["pinned"] > 0
            assert blob["onnx"] == str(golden_export / f"{graph}.onnx") and meta["typing"] == "weak"
            continue
        # TensorRT 11: no precision flags, nothing pinned; the typed copy carries fp16 with fp32 islands as Casts
        assert blob["flags"] == [] and blob["pinned"] == 0 and meta["typing"] == "strong"
        typed = onnx.load(blob["onnx"])
        assert blob["onnx"] == str(tmp_path / "typed" / f"{graph}.fp16.onnx")
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in typed.graph.initializer)
        assert any(n.op_type == "Cast" for n in typed.graph.node)
        io = {t.name: t.type.tensor_type.elem_type for t in (*typed.graph.input, *typed.graph.output)}
        for name, et in io.items():
            kv = name.startswith(("past_key_values.", "present."))
            assert et == (onnx.TensorProto.FLOAT16 if kv else onnx.TensorProto.FLOAT), name


def test_typed_copy_loads_the_weights_once(golden_export, tmp_path, monkeypatch):
    """The fp16 typed copy of a graph with external data (a 7B llm: ~26 GB of fp32 weights) reads those weights
    once: converted in memory and written once, its external data under the copy's own name."""
    from segllm_edge.export.files import data_file
    from segllm_edge.export.tensorrt.typed_graph import typed_graph

    src = tmp_path / "export" / "llm.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(str(golden_export / "llm.onnx")), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data_file(src).name, size_threshold=0)
    real_load, full_loads = onnx.load, []

    def counting_load(f, *args, **kwargs):
        if kwargs.get("load_external_data", True):
            full_loads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(onnx, "load", counting_load)
    plan = B.GraphPlan("llm", src, "fp16", (), [], fp32_nodes=set(), kv_dtype="HALF")
    dst = typed_graph(plan, tmp_path / "engines")
    assert full_loads == [str(src)], full_loads
    assert dst == tmp_path / "engines" / "typed" / "llm.fp16.onnx" and data_file(dst).is_file()
    typed = real_load(str(dst))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in typed.graph.initializer)
    assert data_file(src).is_file() and real_load(str(src)).graph.initializer[0].data_type == onnx.TensorProto.FLOAT


def test_bf16_on_tensorrt11_needs_a_typed_graph(golden_export, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt11([]))
    monkeypatch.setattr(C, "current_device", lambda device_index=0: TRT11)
    with pytest.raises(BackendError, match="strongly typed bf16 engine of seg_head needs a bf16 ONNX graph"):
        B.build_engines(golden_export, "bf16", out_dir=tmp_path, log=lambda *_: None,
                        options=B.BuildOptions(graphs=("seg_head",)))


def test_print_trtexec_for_both_generations(golden_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    args = ["build-engines", "--export", str(golden_export), "--graph", "llm", "--graph", "mask_decoder",
            "--print-trtexec"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "weakly typed" in lines[0]
    llm, dec = lines[1], lines[2]
    assert llm.startswith(f"trtexec --onnx={golden_export / 'llm.onnx'} ") and " --fp16 " in llm
    assert "--precisionConstraints=obey" in llm and ":fp32" in llm.split("--layerPrecisions=")[1]
    assert "--minShapes=inputs_embeds:1x1x" in llm and "past_key_values.0.key:1x" in llm
    assert "--inputIOFormats=fp32:chw,fp16:chw" in llm and "--noTF32" in llm and "--memPoolSize=workspace:8192M" in llm
    assert "--fp16" not in dec and "--noTF32" in dec  # HIPIE stays fp32
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt11([]))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    llm = next(line for line in res.output.splitlines() if line.startswith("trtexec") and "llm" in line)
    assert "--stronglyTyped" in llm and "--fp16" not in llm and "--layerPrecisions" not in llm
    assert "typed/llm.fp16.onnx" in llm


def _parser_of(trt, generation: str):
    """The stand-in's parser with the support check of one TensorRT release only (the real API of each: 10.0
    ``supports_model`` -> (ok, [(nodes, ok), ...]); 10.1+ ``supports_model_v2`` and the subgraph getters; a parser
    with neither answers through ``parse`` and its errors). seg_head is 'unsupported' in nodes 3 and 4."""
    base = trt.OnnxParser

    class Error:
        def __str__(self):
            return "In node 3 (Einsum): UNSUPPORTED_NODE"

    if generation == "10.0":
        class Parser(base):
            def supports_model(self, model, path):
                assert isinstance(model, bytes) and path.endswith(".onnx")
                bad = path.endswith("seg_head.onnx")
                return (not bad, [([0, 1, 2], True), ([3, 4], not bad)])
    elif generation == "parse":
        class Parser(base):
            def parse(self, model, path):
                self.num_errors = int(path.endswith("seg_head.onnx"))
                return not self.num_errors

            def get_error(self, i):
                return Error()
    else:
        class Parser(base):
            num_subgraphs = 1

            def supports_model_v2(self, model, path):
                self.bad = path.endswith("seg_head.onnx")
                return not self.bad

            def is_subgraph_supported(self, i):
                return not self.bad

            def get_subgraph_nodes(self, i):
                return [3, 4]
    return Parser


@pytest.mark.parametrize("generation", ["10.0", "10.1", "11", "parse"])
def test_check_only_uses_the_tensorrt_parser_when_importable(golden_export, monkeypatch, generation):
    """--check-only asks TensorRT's parser with the check the installed release has: ``supports_model`` on 10.0
    (no ``supports_model_v2`` there), ``supports_model_v2`` on 10.1+, on a strongly typed network on 11."""
    if generation == "11":
        trt = fake_trt11([])
    else:
        trt = make_fake_tensorrt([])
        trt.__version__ = {"10.0": "10.0.1.6"}.get(generation, trt.__version__)
    trt.OnnxParser = _parser_of(trt, generation)
    args = ["build-engines", "--export", str(golden_export), "--graph", "seg_head", "--graph", "llm", "--check-only"]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    want = "In node 3 (Einsum)" if generation == "parse" else "subgraph 1 (2 node(s)" if generation == "10.0" \
        else "subgraph 0 (2 node(s)"
    assert f"seg_head        TensorRT parser: {want}" in res.output, res.output
    assert "llm             TensorRT parser" not in res.output
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "static op table" in res.output, res.output
