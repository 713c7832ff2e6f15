"""Runs inside a venv with only ``.[cpu,serve]`` (no torch, no transformers); driven by tests/test_torch_free.py.

argv: EXPORT IMAGE OUT.npz. Runs the golden conversation through ``load(export)`` (backend inferred), the
profiler, and the Triton BLS round loop in-process (ConversationService over InProcessCaller: the BLS and
preprocess models' code without the transport), and saves what the test compares.
"""
import importlib.util
import json
import sys

import numpy as np

QUESTIONS = ("Segment the red circle.", "Segment the blue square next to it.[REF:1]",
             "Segment the object above instance 2.[REF:2]")


def main(export, image, out):
    missing = {m: importlib.util.find_spec(m) is None for m in ("torch", "transformers")}
    import segllm_edge
    from segllm_edge.client import connect  # noqa: F401  (the client imports without a server)
    from segllm_edge.runtime.profiler import timings_table
    from segllm_edge.serving.bls import ConversationService, InProcessCaller, TritonBlsBackend
    from segllm_edge.serving.pystub import RequestContext
    from segllm_edge.serving.wire import decode_mask_png

    model = segllm_edge.load(export)
    s = model.session(image)
    res = [s.ask(q) for q in QUESTIONS]
    table = timings_table([r.timings for r in res])

    service = ConversationService(lambda: TritonBlsBackend(export, InProcessCaller(export)))
    payload = open(image, "rb").read()
    bls_masks = []
    token = None
    for i, q in enumerate(QUESTIONS):
        inputs = {"question": np.array([q.encode()], dtype=np.object_),
                  "end": np.array([i == len(QUESTIONS) - 1])}
        if i == 0:
            inputs["start"] = np.array([True])
            inputs["image"] = np.array([payload], dtype=np.object_)
        else:
            inputs["conversation"] = np.array([token], dtype=np.object_)
        got = service.handle(inputs, RequestContext())
        token = got["conversation"].reshape(-1)[0]
        bls_masks.append(decode_mask_png(got["mask"].reshape(-1)[0]))
    np.savez(out, model_masks=np.stack([r.model_mask for r in res]), masks=np.stack([r.mask for r in res]),
             bls_masks=np.stack(bls_masks), query_index=np.array([r.query_index for r in res]),
             info=json.dumps({"missing": missing, "backend": model.backend.name, "table": table,
                              "torch_loaded": "torch" in sys.modules, "transformers_loaded": "transformers" in sys.modules}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
