"""The exported llm graph run block of decoder layers by block, one block's onnxruntime session at a time.

:class:`BlockedSession` is the llm of :func:`segllm_edge.contracts.llm_blocks.split_llm`'s stages (the same nodes
and weights as the whole ``llm.onnx``, cut by node ranges) for the lean backend (:mod:`.lean_sessions`): ``run``
opens one stage's session, runs it, copies its outputs out, closes it, then the next, so the process holds one
block's weights (fp16 weights: one block cast to fp32 by the CPU provider) instead of the whole llm's. This is for
the drift report's probe on a 7B, not for serving (each llm call creates one session per block).

What differs from the whole graph's session: nothing for an fp32 graph (bit for bit, tests/test_drift_blocks.py);
for fp16, the tensors crossing a cut are handed over in the graph's fp16, where the whole graph's CPU session may
keep them in fp32 (onnxruntime runs fp16 MatMuls in fp32 and drops the Cast pairs between them), so a few
roundings more: the fp16 graph's own precision, never less rounding than the whole-graph run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..contracts.llm_blocks import LlmBlocks, layers_per_block_for, llm_layer_weight_bytes, split_llm  # noqa: F401
from ..process_memory import release_memory


class BlockedSession:
    """The llm of :func:`split_llm`'s stages with onnxruntime's session interface (``run``, ``get_inputs``): each
    ``run`` opens, runs and closes the stages one after the other (``open_stage(path)`` gives a session whose
    outputs own their memory, :class:`.lean_sessions.OwnedOutputs`)."""

    def __init__(self, blocks: LlmBlocks, open_stage: Callable[[Path], Any]):
        self.blocks = blocks
        self._open = open_stage
        self.stages_opened = 0

    def get_inputs(self):
        return list(self.blocks.inputs)

    def run(self, output_names, feeds, run_options=None):
        store = dict(feeds)
        remaining = {}
        for s, st in enumerate(self.blocks.stages):
            for i in st.inputs:
                remaining[i] = s
        wanted = list(output_names or self.blocks.outputs)
        results = {}
        for s, st in enumerate(self.blocks.stages):
            session = self._open(st.path)
            self.stages_opened += 1
            try:
                out = session.run(st.outputs, {i: store[i] for i in st.inputs})
            finally:
                del session
                release_memory()
            for name, value in zip(st.outputs, out):
                if name in wanted:
                    results[name] = value
                store[name] = value
            for name in [n for n, last in remaining.items() if last <= s and n not in feeds]:
                store.pop(name, None)   # nothing later reads it
                del remaining[name]
        return [results[n] for n in wanted]



__all__ = ["BlockedSession", "LlmBlocks", "layers_per_block_for", "llm_layer_weight_bytes", "split_llm"]
