"""Bad input gets a clear error and leaves the session usable with its state intact."""
import numpy as np
import pytest

from segllm_edge import ContextOverflowError, ImageError, QuestionError, RoundReferenceError, SessionError


@pytest.fixture(scope="module")
def sess(golden_model, golden_image):
    s = golden_model.session(golden_image)
    s.ask("Segment the red circle.")
    return s


def _state(s):
    return (len(s.rounds), s.context_length, s._cache.length)


def test_round_one_cannot_refer(golden_model, golden_image):
    s = golden_model.session(golden_image)
    with pytest.raises(RoundReferenceError, match="no round has been answered yet"):
        s.ask("Segment it.", refs=[1])
    assert s.rounds == [] and s._cache is None


@pytest.mark.parametrize("q,refs,err,match", [
    ("Segment the thing.[REF:5]", None, RoundReferenceError, "refers to round 5, but rounds 1..1 exist"),
    ("Segment the thing.", [0], RoundReferenceError, "refers to round 0"),
    ("Segment the thing.", ["1"], RoundReferenceError, "must be a round number"),
    ("Segment the <seg> thing.", None, QuestionError, "reserved token '<seg>'"),
    ("Segment <video> here.", None, QuestionError, "reserved token '<video>'"),
    (None, None, QuestionError, "must be a string"),
    ("word " * 2100, None, QuestionError, "over the limit of 8192 bytes"),
    ("word " * 1200, None, QuestionError, "over the limit of 1024 tokens"),
])
def test_bad_questions_leave_state_unchanged(sess, q, refs, err, match):
    before = _state(sess)
    with pytest.raises(err, match=match):
        sess.ask(q, refs=refs)
    assert _state(sess) == before


def test_kv_budget(golden_model, golden_image):
    per_tok = golden_model.info.kv_bytes_per_token()
    with pytest.raises(ContextOverflowError, match="cannot hold even the first round"):
        golden_model.session(golden_image, max_kv_bytes=per_tok * 10)
    s = golden_model.session(golden_image, max_kv_bytes=per_tok * 330)
    s._check_context(330)
    with pytest.raises(ContextOverflowError, match="budget of"):
        s._check_context(331)
    with pytest.raises(ContextOverflowError, match="over the model's context of 2048"):
        s._check_context(2049)


def test_failure_inside_a_round_rolls_back(sess, monkeypatch):
    before = _state(sess)
    backend = sess.backend

    def boom(*a, **k):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(backend, "mask_decode", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        sess.ask("Segment the blue square.[REF:1]")
    assert _state(sess) == before
    monkeypatch.undo()
    r = sess.ask("Segment the blue square.[REF:1]")
    assert r.round == 2 and r.refs == (1,) and sess._cache.length == sess.context_length


def test_empty_mask_cannot_be_referenced(sess):
    kept = sess.rounds[0].result.model_mask
    sess.rounds[0].result.model_mask = np.zeros_like(kept)
    try:
        with pytest.raises(RoundReferenceError, match="round 1 produced an empty mask"):
            sess.ask("Segment it.", refs=[1])
    finally:
        sess.rounds[0].result.model_mask = kept


def test_closed_session(golden_model, golden_image):
    s = golden_model.session(golden_image)
    s.close()
    with pytest.raises(SessionError, match="closed"):
        s.ask("Segment it.")


def test_bad_image_fails_before_a_session_exists(golden_model, tmp_path):
    with pytest.raises(ImageError):
        golden_model.session(tmp_path / "missing.png")
