"""A device backend's activations stay on its device between stages (issue 23 item 6): the session moves token
embeddings, image tokens, mask tokens and hidden states to the host only for a trace. The torch backend on the
CPU returns tensors as it does on CUDA, so what the session converts to numpy is what would cross PCIe."""
from __future__ import annotations

import numpy as np

GOLDEN_QUESTIONS = ("Segment the red circle.", "Segment the blue square.", "Segment it.[REF:1]")


def test_session_keeps_a_device_backends_arrays_on_the_device(golden_model, golden_image, monkeypatch):
    import segllm_edge.runtime.backend as backend_mod
    import segllm_edge.runtime.session as session_mod

    H = golden_model.backend.info.hidden_size
    hosted = []
    real = backend_mod.host

    def recording(x):
        a = real(x)
        hosted.append(tuple(a.shape))
        return a

    monkeypatch.setattr(backend_mod, "host", recording)
    monkeypatch.setattr(session_mod, "host", recording)
    s = golden_model.session(golden_image)
    for q in GOLDEN_QUESTIONS:
        hosted.clear()
        r = s.ask(q)
        wide = [shape for shape in hosted if shape and shape[-1] == H]
        assert not wide, (q, wide)         # no (tokens, H) array went to the host
        assert all(int(np.prod(shape)) <= 1024 for shape in hosted), hosted   # the selected query's scores/box
        assert r.mask.dtype == bool
    im = s._image
    assert hasattr(im.image_tokens, "detach") and hasattr(s.rounds[0].mask_tokens, "detach")
    monkeypatch.setattr(backend_mod, "host", real)
    monkeypatch.setattr(session_mod, "host", real)
    # the same rounds with a trace: the trace's arrays are numpy, and the masks the same
    t = golden_model.session(golden_image, trace=True)
    for q, r0 in zip(GOLDEN_QUESTIONS, s.rounds):
        r = t.ask(q)
        assert isinstance(r.trace["hidden"], np.ndarray) and r.trace["hidden"].shape[-1] == H
        assert np.array_equal(r.mask, r0.result.mask)
