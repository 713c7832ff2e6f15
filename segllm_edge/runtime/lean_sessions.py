"""Lean loading: an export whose graphs are resident one at a time.

:func:`load_lean` gives the onnxruntime (or OpenVINO) backend of an export folder whose ``sessions`` is a
:class:`OneGraphAtATime`: a graph's session is opened when the round loop calls that graph and closed (its memory
handed back) before another graph's is opened. The conversation's own state (KV cache, image features, masks)
lives in host arrays and survives the switches, so the rounds compute exactly what the resident backend computes;
the process holds the largest graph's session instead of the sum of all of them. A round calls four or five
graphs, each switch costs a session creation: this is for the drift report's probe on a machine where the whole
export would not fit at once (``segllm_edge.drift_probe(lean=True)``), not for serving.

Two onnxruntime details decide what "one graph at a time" really holds (measured on the 7B-width probe,
benchmarks/results/export_memory_7b.md):

* onnxruntime hands a run's outputs to numpy without a copy, and each output keeps the allocator of the session
  that made it alive — its whole CPU arena, the run's activation peak included — after the session is closed.
  The conversation keeps outputs across graph switches (the KV cache, image features, traced rounds), so every
  closed session's arena stayed resident and the "one graph" process grew round by round (fp16 probe: +0.5 to
  +1 GiB per graph call, 3.4 GiB held between graphs by round 3). :class:`OwnedOutputs` copies the outputs out
  (a few MB per call), so closing a session frees its arena.
* the sessions are created without MatMul weight prepacking (``session.disable_prepacking``): prepacking makes a
  packed copy of every weight on each of the round's session creations (23 s for the fp32 llm of 4 layers, and
  its packed 3 GB anonymous instead of the file's pages); without it the external data stays memory-mapped. The
  same kernels run on the same weights (the resident backend opens its CLIP graphs this way too).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..contracts import ort as ortc
from ..contracts.export_folder import ExportFolder, open_export
from ..errors import BackendError
from ..process_memory import release_memory
from .ort_backend import OrtBackend, check_graph_inputs, check_precision_runs_on
from .ort_values import run as run_session

LEAN_BACKENDS = ("onnxruntime", "openvino")


class OneGraphAtATime(Mapping):
    """graph name → its session, opened on first use after the previously opened one is closed."""

    def __init__(self, names, open_graph: Callable[[str], Any]):
        self._names = tuple(names)
        self._open = open_graph
        self._name: str | None = None
        self._session = None
        self.opened: list[str] = []   # the graphs in the order their sessions were opened

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        if name != self._name:
            self.close()
            self._session = self._open(name)
            self._name = name
            self.opened.append(name)
        return self._session

    def __contains__(self, name) -> bool:  # Mapping's default would open the graph
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def resident(self) -> str | None:
        """The graph whose session is open now (None when none is)."""
        return self._name

    def close(self) -> None:
        """Close the open session, if any, and give its memory back."""
        if self._session is not None:
            self._name, self._session = None, None
            release_memory()


class OwnedOutputs:
    """An onnxruntime session whose ``run`` returns arrays that own their memory, not views into the session's
    arena (which would keep the arena alive after the session is closed). Everything else is the session's."""

    def __init__(self, session):
        self.session = session

    def run(self, output_names, feeds, run_options=None):
        return [np.array(o, copy=True) if isinstance(o, np.ndarray) else o
                for o in run_session(self.session, output_names, feeds, run_options)]

    def __getattr__(self, name):
        return getattr(self.session, name)


def lean_session_options(threads: int | None = None):
    """The SessionOptions of a lean session: the package's (:func:`segllm_edge.contracts.ort.session_options`),
    without weight prepacking. A new object each call: nobody else's options are changed."""
    opts = ortc.session_options(threads)
    opts.add_session_config_entry(ortc.DISABLE_PREPACKING, "1")
    return opts


def _ort_opener(export: ExportFolder, device: str, threads: int | None) -> Callable[[str], Any]:
    ortc.require_onnxruntime()
    provs = ortc.providers_for(device)
    check_precision_runs_on(export, provs)

    def open_graph(name: str):
        return OwnedOutputs(ortc.open_session(export.graph_path(name), lean_session_options(threads), provs, name))

    return open_graph


def _openvino_opener(export: ExportFolder, device: str, threads: int | None) -> Callable[[str], Any]:
    from .openvino_backend import open_graph as open_compiled, require_openvino

    if str(device) != "cpu":
        raise BackendError(f"the openvino backend runs on the CPU only, not {device!r}")
    core = require_openvino().Core()
    threads = threads or os.cpu_count() or 1

    def open_graph(name: str):
        return open_compiled(core, export.graph_path(name), name, "f32", threads, kv_layout=export.manifest.kv_layout)

    return open_graph


def can_split_llm(export: ExportFolder, backend: str) -> bool:
    """Whether :func:`load_lean` can run this export's llm block of layers by block (onnxruntime, concat KV)."""
    from ..contracts.llm_blocks import can_split

    return can_split(export.manifest.kv_layout, backend)


def _blocked_llm_opener(export: ExportFolder, opener, device: str, threads: int | None, layers_per_block: int):
    """The llm graph split into blocks of ``layers_per_block`` decoder layers (:mod:`.graph_blocks`), each block's
    onnxruntime session opened and closed within the llm call; the other graphs through ``opener``."""
    from .graph_blocks import BlockedSession, split_llm

    blocks = split_llm(export.graph_path("llm"), layers_per_block)
    provs = ortc.providers_for(device)

    def open_stage(stage_path):
        return OwnedOutputs(ortc.open_session(stage_path, lean_session_options(threads), provs, "llm"))

    def open_graph(name: str):
        return BlockedSession(blocks, open_stage) if name == "llm" else opener(name)

    return open_graph, blocks


def load_lean(path, backend: str = "onnxruntime", device: str = "cpu", threads: int | None = None,
              llm_layers_per_block: int | None = None) -> OrtBackend:
    """The ``backend`` (onnxruntime or openvino, fp32 inference precision) of the export at ``path`` with one graph
    resident at a time. Every graph is opened once here, one after the other, so a graph that cannot load fails
    now as it would on the resident backend, not in the middle of a conversation.

    ``llm_layers_per_block``: run the llm's exported graph in blocks of that many decoder layers, one block's session
    at a time (:mod:`.graph_blocks`: the same nodes and weights, the same outputs); onnxruntime with the concat KV
    layout only (elsewhere, and at or above the llm's depth, the llm runs whole). The backend's ``llm_blocks`` is
    then the split's plan (None when the llm runs whole)."""
    if backend not in LEAN_BACKENDS:
        raise BackendError(f"lean loading runs on {' or '.join(LEAN_BACKENDS)}, not backend={backend!r}")
    export = open_export(Path(path))
    opener = (_ort_opener if backend == "onnxruntime" else _openvino_opener)(export, device, threads)
    blocks = None
    if llm_layers_per_block and llm_layers_per_block < export.info.num_layers and can_split_llm(export, backend):
        opener, blocks = _blocked_llm_opener(export, opener, device, threads, llm_layers_per_block)
    graphs = export.manifest.graphs

    def open_checked(name: str):
        session = opener(name)
        check_graph_inputs(graphs[name], session)
        return session

    sessions = OneGraphAtATime(graphs, open_checked)
    for name in graphs:
        sessions[name]
    if backend == "onnxruntime":
        model = OrtBackend.from_sessions(export, sessions)
    else:
        from .openvino_backend import OpenVinoBackend

        model = OpenVinoBackend.from_sessions(export, sessions)
        model.hipie_precision = "fp32"
    model.llm_blocks = blocks   # keeps the blocks' folder alive as long as the backend
    return model
