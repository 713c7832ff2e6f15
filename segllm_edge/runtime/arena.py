"""Giving back the memory a long run took, so a server's footprint does not keep the peak of its biggest prefill.

onnxruntime's CPU arena keeps every block it ever took from the system: after a 1,000-token prefill of a
7B-width llm (the attention scores alone are heads x 1,000 x context x 4 bytes per layer) the llm session
held ~1 GB more, for good, though a ~15-token round needs a fraction of it. With the run option
``memory.enable_memory_arena_shrinkage`` the arena frees its unused regions at the end of that run.

Shrinking on every run would give back, and fault in again, the blocks each short round reuses (the new
``present.*`` tensors); so only a run of more than :data:`PREFILL_TOKENS` new tokens shrinks
(:func:`llm_run_options`). Measured on one 7B-width layer (the 1,000 + 480-token prefills of
``benchmarks/bench_triton_state.py``): the session held 985 MiB over its weights, 154 MiB with this; a
~15-token round at ~1,900 tokens was no slower. (No arena at all: 142 MiB but rounds ~10 % slower.)

:func:`trim_heap` is the same for sessions without an arena (the Triton graph models): glibc keeps freed
blocks below its mmap threshold (up to 32 MiB) in its heaps until ``malloc_trim``.
"""
from __future__ import annotations

import functools
import sys

from ..process_memory import trim_heap

#: a run with more new tokens than this is a prefill: its arena growth is given back when it ends
PREFILL_TOKENS = 64

ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"


@functools.lru_cache(maxsize=None)
def shrink_run_options(devices: str = "cpu:0"):
    """``onnxruntime.RunOptions`` that shrink the arenas of ``devices`` (``"cpu:0"``, ``"cpu:0;gpu:0"``)
    when the run ends."""
    from ..contracts import ort as ortc

    opts = ortc.require_onnxruntime().RunOptions()
    opts.add_run_config_entry(ARENA_SHRINKAGE, devices)
    return opts


def llm_run_options(session, new_tokens: int):
    """The run options of an llm call on ``new_tokens`` tokens: shrink the CPU arena after a prefill. None for
    anything but an onnxruntime ``InferenceSession`` with a CPU arena (an OpenVINO stand-in takes no run options; a
    session without an arena has nothing to shrink)."""
    ort = sys.modules.get("onnxruntime")
    session = getattr(session, "session", session)   # a lean session's OwnedOutputs wrapper: the session inside
    if ort is None or not isinstance(session, ort.InferenceSession) or int(new_tokens) <= PREFILL_TOKENS:
        return None
    if not session.get_session_options().enable_cpu_mem_arena:
        return None   # no arena to shrink (onnxruntime rejects the option then)
    return shrink_run_options()




__all__ = ["ARENA_SHRINKAGE", "PREFILL_TOKENS", "llm_run_options", "shrink_run_options", "trim_heap"]
