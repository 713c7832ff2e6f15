"""The graphs the ``segllm`` BLS process runs itself (:data:`~segllm_edge.contracts.serving.BLS_GRAPHS`).

* ``llm``: so each conversation's KV cache stays in the process that owns the conversation. Called
  as a Triton model, the whole cache went to the llm stub and back every round (at 7B in fp32 1 MiB
  per token: a 1,000-token conversation moved ~1 GiB each way per round, through ``/dev/shm``). Here
  the cache is a :class:`~segllm_edge.runtime.kv_cache.HostKVCache` whose arrays onnxruntime reads in
  place (on a GPU: see docs/architecture.md, *Serving state*).
* ``vision_encoder`` + ``mask_encoder``: both hold the CLIP tower and ``mm_projector``; opened in
  one process with their identical initializers held once
  (:func:`~segllm_edge.runtime.shared_weights.open_sessions_sharing_weights`), CLIP is in memory once
  per server instead of once per graph model.

Cost: one LLM + CLIP copy per round-loop model instance (the repository has one ``segllm`` instance,
which holds every conversation; a variant BLS model -- e.g. ``write_bls_model(name="segllm_short")`` --
holds its own copy). The work these graphs do runs in the BLS process, which Triton runs one request
at a time -- as it did before, since the BLS waited on each model call anyway.
"""
from __future__ import annotations

import os
import time
from typing import Mapping, Sequence

import numpy as np

from ..contracts import ort as ortc
from ..contracts.export_folder import ExportFolder
from ..contracts.serving import BLS_GRAPHS
from ..runtime.shared_weights import CLIP_GRAPHS


def bls_providers(device: str = "auto") -> list:
    """onnxruntime providers for the BLS graphs: ``"auto"`` is CUDA where this onnxruntime has it, else CPU."""
    if device == "auto":
        ort = ortc.require_onnxruntime()
        device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return ortc.providers_for(device)


class BlsGraphs:
    """onnxruntime sessions of :data:`BLS_GRAPHS` in this process; ``run(graph, feeds, outputs)``."""

    graphs = BLS_GRAPHS

    def __init__(self, export: ExportFolder, threads: int | None = None, device: str = "auto"):
        from ..runtime.shared_weights import open_sessions_sharing_weights

        self.providers = bls_providers(device)
        threads = int(threads or os.cpu_count() or 1)

        def options():
            return ortc.session_options(threads)

        llm = {"llm": ortc.open_session(export.graph_path("llm"), options(), self.providers, "llm")}
        clip, self.shared = open_sessions_sharing_weights({g: export.graph_path(g) for g in CLIP_GRAPHS},
                                                          options, self.providers)
        self.sessions = {**llm, **clip}
        self.run_ms: dict[str, float] = {}

    def __contains__(self, graph: str) -> bool:
        return graph in self.sessions

    def run(self, graph: str, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        try:
            return self.sessions[graph].run(list(outputs), dict(feeds))
        finally:
            self.run_ms[graph] = self.run_ms.get(graph, 0.0) + (time.perf_counter() - t0) * 1e3


__all__ = ["BlsGraphs", "CLIP_GRAPHS", "bls_providers"]
