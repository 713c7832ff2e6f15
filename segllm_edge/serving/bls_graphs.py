"""The graphs the ``segllm`` BLS process runs itself (:data:`~segllm_edge.contracts.serving.BLS_GRAPHS`).

* ``llm``: so each conversation's KV cache stays in the process that owns the conversation. Called
  as a Triton model, the whole cache went to the llm stub and back every round (at 7B in fp32 1 MiB
  per token: a 1,000-token conversation moved ~1 GiB each way per round, through ``/dev/shm``). Here
  the cache is a :class:`~segllm_edge.runtime.kv_cache.HostKVCache` whose arrays onnxruntime reads in
  place on the CPU; on a GPU (or with ``bind_kv=True``) an
  :class:`~segllm_edge.runtime.device_kv_cache.OrtValueKVCache` of device buffers bound with IOBinding,
  so between rounds the cache stays in device memory.
* ``vision_encoder`` + ``mask_encoder``: both hold the CLIP tower and ``mm_projector``; opened in
  one process with their identical initializers held once
  (:func:`~segllm_edge.runtime.shared_weights.open_sessions_sharing_weights`), CLIP is in memory once
  per server instead of once per graph model.

Cost: one LLM + CLIP copy per round-loop model instance (the repository has one ``segllm`` instance,
which holds every conversation; a variant BLS model -- e.g. ``write_bls_model(name="segllm_short")`` --
holds its own copy). The work these graphs do runs in the BLS process, on the round threads of
:class:`~segllm_edge.serving.round_scheduler.RoundScheduler`: rounds of different conversations call these
sessions at the same time (``InferenceSession.run`` is thread-safe; each conversation's KV cache is its own and
only one of its rounds runs at a time), so nothing here holds per-call state.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from ..contracts import ort as ortc
from ..contracts.export_folder import ExportFolder
from ..contracts.serving import BLS_GRAPHS
from ..runtime.ort_values import run as run_session
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

    def __init__(self, export: ExportFolder, threads: int | None = None, device: str = "auto",
                 bind_kv: bool | None = None):
        from ..runtime.shared_weights import open_sessions_sharing_weights

        self.providers = bls_providers(device)
        first = self.providers[0]
        on_cuda = (first[0] if isinstance(first, tuple) else first) == "CUDAExecutionProvider"
        self.kv_device = ("cuda", int(dict(first[1]).get("device_id", 0)) if isinstance(first, tuple) else 0) \
            if on_cuda else ("cpu", 0)
        self.bind_kv = on_cuda if bind_kv is None else bool(bind_kv)   # KV cache as device OrtValues (IOBinding)
        threads = int(threads or os.cpu_count() or 1)

        def options():   # as load(export)'s onnxruntime backend opens them (the same results, bit for bit)
            return ortc.session_options(threads)

        llm = {"llm": ortc.open_session(export.graph_path("llm"), options(), self.providers, "llm")}
        clip, self.shared = open_sessions_sharing_weights({g: export.graph_path(g) for g in CLIP_GRAPHS},
                                                          options, self.providers)
        self.sessions = {**llm, **clip}

    def __contains__(self, graph: str) -> bool:
        return graph in self.sessions

    def llm_bound(self, embeds: np.ndarray, cache, inputs: Sequence[str], outputs: Sequence[str]) -> np.ndarray:
        """The llm on an :class:`OrtValueKVCache` (IOBinding): hidden states back, the cache grown in place."""
        from ..runtime.device_kv_cache import run_llm_bound

        return run_llm_bound(self.sessions["llm"], embeds, cache, inputs[0], list(inputs[1:]), outputs[0],
                             list(outputs[1:]))

    def llm_inplace(self, embeds: np.ndarray, cache, embeds_name: str, past: Sequence[str], hidden_name: str,
                    present: Sequence[str]) -> np.ndarray:
        """The llm of an export in the in-place KV layout on a
        :class:`~segllm_edge.runtime.kv_buffer.BufferKVCache`: the round's tokens written into its buffers."""
        from ..runtime.arena import llm_run_options
        from ..runtime.kv_buffer import run_llm_inplace

        sess = self.sessions["llm"]
        return run_llm_inplace(sess, embeds, cache, embeds_name, list(past), hidden_name, list(present),
                               llm_run_options(sess, np.shape(embeds)[1]))

    def run(self, graph: str, feeds: Mapping[str, np.ndarray], outputs: Sequence[str],
            run_options=None) -> list[np.ndarray]:
        return run_session(self.sessions[graph], list(outputs), dict(feeds), run_options)   # bf16 via OrtValues


__all__ = ["BlsGraphs", "CLIP_GRAPHS", "bls_providers"]
