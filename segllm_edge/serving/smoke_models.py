"""Tiny python-backend models that check a Triton deployment end to end.

* :class:`AddOne` -- numpy only: ``Y = X + 1``.
* :class:`PackageProbe` -- imports ``segllm_edge`` and ``onnxruntime`` inside the stub and runs a
  one-node ONNX graph: ``Z = 2 * Y``; ``INFO`` says which Python/numpy/onnxruntime it ran with.
* :class:`SequenceCounter` -- sequence-batched: keeps a running total per correlation id.

Used by ``tests/test_tritonserver_smoke.py``; handy as a health check next to a real repository.
"""
from __future__ import annotations

import sys

import numpy as np

from .pystub import PythonModel, RequestContext, SequenceStore


class AddOne(PythonModel):
    def infer(self, inputs: dict, ctx: RequestContext) -> dict:
        return {"Y": inputs["X"] + 1}


def _double_graph() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["Y", "two"], ["Z"])], "double",
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["n"])], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class PackageProbe(PythonModel):
    def initialize(self) -> None:
        import onnxruntime as ort

        import segllm_edge

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(_double_graph(), opts, providers=["CPUExecutionProvider"])
        self.info = (f"segllm_edge {segllm_edge.__version__} from {segllm_edge.__file__}; "
                     f"python {sys.version.split()[0]} prefix {sys.prefix}; numpy {np.__version__}; "
                     f"onnxruntime {ort.__version__}")

    def infer(self, inputs: dict, ctx: RequestContext) -> dict:
        (z,) = self.session.run(["Z"], {"Y": np.asarray(inputs["Y"], dtype=np.float32)})
        return {"Z": z, "INFO": np.array([self.info.encode()], dtype=np.object_)}


class SequenceCounter(PythonModel):
    """``TOTAL`` = running sum of ``INCREMENT`` over the sequence, ``STEP`` = requests so far."""

    def initialize(self) -> None:
        seq = self.config.get("sequence_batching") or {}
        idle_us = int(seq.get("max_sequence_idle_microseconds") or 0)
        self.sequences: SequenceStore[dict] = SequenceStore(lambda: {"total": 0, "steps": 0},
                                                            idle_timeout_s=idle_us / 1e6 if idle_us else None)

    def infer(self, inputs: dict, ctx: RequestContext) -> dict:
        inc = np.asarray(inputs["INCREMENT"])          # [1] or, with max_batch_size > 0, [1, 1]
        state = self.sequences.enter(ctx)
        state["total"] += int(inc.sum())
        state["steps"] += 1
        self.sequences.leave(ctx)
        return {"TOTAL": np.full(inc.shape, state["total"], dtype=np.int64),
                "STEP": np.full(inc.shape, state["steps"], dtype=np.int32)}
