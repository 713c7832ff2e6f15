"""Hostile and careless input against the API, the export and the CLI (issue 11, no server needed).

Every case must be refused with the package's own error class, naming the problem, before any
expensive work, and must leave the session exactly as it was. The server half is in
tests/test_abuse_server.py. Bounded: small images (big ones only as headers of cheap 1-bit PNGs),
a few tiny-model rounds.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import GOLDEN_QUESTIONS

from segllm_edge import limits
from segllm_edge.errors import (CheckpointError, ConfigError, ContextOverflowError, ImageError, QuestionError,
                                RoundReferenceError, SegLLMError)
from segllm_edge.pipeline.images import load_image


def _png(w: int, h: int, mode: str = "1") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


# -- images: limits read from the header, before decoding (finding 3, 8) -------------------------
@pytest.mark.parametrize("w,h,match", [
    (1, 60000, "aspect ratio of 60000:1"),        # CLIP's resize would allocate ~15 GB
    (3000, 1, "aspect ratio of 3000:1"),          # HIPIE's resize would round the short side to 0 px
    (10000, 6000, "over the limit of 50000000 pixels"),
    (20000, 10000, "far over the limit"),         # PIL's DecompressionBombError, as an ImageError
])
def test_image_limits_from_the_header(tmp_path, w, h, match):
    p = tmp_path / "big.png"
    p.write_bytes(_png(w, h))
    with pytest.raises(ImageError, match=match):
        load_image(p)
    from segllm_edge.serving.models import decode_image_bytes

    with pytest.raises(ImageError, match=match):     # the server's preprocess: the same limits
        decode_image_bytes(p.read_bytes())


def test_image_array_limits_and_url():
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(np.zeros((1, 3000, 3), np.uint8))
    with pytest.raises(ImageError, match="is a URL"):
        load_image("https://example.com/cat.jpg")


def test_exif_orientation_is_honoured(tmp_path):
    """A phone JPEG stored landscape with orientation 6 (rotate 90° CW) is what a viewer shows: portrait."""
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255                                  # left half white in storage
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    p = tmp_path / "phone.jpg"
    img.save(p, exif=exif, quality=95)
    got = load_image(p)
    assert got.shape == (20, 10, 3)                  # as displayed
    assert got[:10].mean() > 200 and got[10:].mean() < 50   # stored left half is the displayed top half
    from segllm_edge.serving.models import decode_image_bytes

    assert np.array_equal(decode_image_bytes(p.read_bytes()), got)


# -- questions and references (finding 8) -----------------------------------------------------
@pytest.fixture(scope="module")
def sess(golden_model, golden_image):
    return golden_model.session(golden_image)      # every case is refused before a round would run


def _state(s):
    return (len(s.rounds), s.context_length, s._cache, s._image)


@pytest.mark.parametrize("q,refs,err,match", [
    ("Segment it.", 5, RoundReferenceError, "refs must be a list of round numbers"),
    ("Segment it.", "1", RoundReferenceError, "refs must be a list"),
    ("Segment it.", [1] * 17, RoundReferenceError, "over the limit of 16"),
    ("Segment it.[REF:-1]", None, RoundReferenceError, "not a list of round numbers"),
    ("Segment it.[REF:abc]", None, RoundReferenceError, "not a list of round numbers"),
    ("Segment [REF:1] it.", None, RoundReferenceError, "in the middle of the question"),
    ("", None, QuestionError, "empty"),
    ("   \n", None, QuestionError, "empty"),
    ("[REF:1]", None, QuestionError, "only references"),
    ("x" * 10_000_000, None, QuestionError, "over the limit of 8192 bytes"),   # refused before tokenizing
])
def test_bad_questions_are_refused_and_leave_the_session(sess, q, refs, err, match):
    before = _state(sess)
    with pytest.raises(err, match=match):
        sess.ask(q, refs=refs)
    assert _state(sess) == before


def test_repeated_reference_groups_leave_no_literal(sess):
    from segllm_edge.pipeline.tokenizer import split_refs

    assert split_refs("Segment it.[REF:1][REF:1]") == ("Segment it.", [1, 1])
    assert "[REF" not in split_refs("Segment it. [REF:1] [ref:1]")[0]


@pytest.mark.parametrize("kw", [{"max_kv_bytes": "abc"}, {"max_kv_bytes": -1}, {"max_bytes": 1.5},
                                {"max_kv_bytes": True}])
def test_bad_budget_arguments(golden_model, golden_image, kw):
    with pytest.raises(ConfigError, match="must be a positive number of bytes"):
        golden_model.session(golden_image, **kw)


def test_masks_count_in_the_session_budget(golden_model):
    big = np.zeros((4000, 4000, 3), np.uint8)
    s = golden_model.session(big, max_bytes=100 * 2**20)
    assert s.round_bytes(False) >= 4000 * 4000        # the original-size mask of every round is counted
    with pytest.raises(ContextOverflowError, match="masks of a 4000x4000 image"):
        s.ask("Segment it.")                          # refused before round 1 runs anything
    assert s.rounds == [] and s._cache is None and s._image is None


# -- transactional rounds (finding 4) ---------------------------------------------------------
class Injected(Exception):
    pass


def _fail_after(stage_name: str, exc_type):
    """A StageTimer whose ``stage_name`` raises after the stage's work is done (state already changed)."""
    import contextlib

    from segllm_edge.runtime import profiler

    class Failing(profiler.StageTimer):
        @contextlib.contextmanager
        def stage(self, name):
            with super().stage(name):
                yield
            if name == stage_name:
                raise exc_type(f"injected after {name}")

    return Failing


def _snapshot(s):
    cache = s._cache
    arrays = None
    if cache is not None:   # the torch backend's DynamicCache layers, or a host cache's numpy arrays
        layers = getattr(getattr(cache, "cache", None), "layers", None)
        arrays = ([(_np(la.keys), _np(la.values)) for la in layers] if layers is not None
                  else [(_np(a), _np(a)) for a in cache.arrays])
    return (len(s.rounds), s.context_length, cache.length if cache else None, id(s._image),
            [r.mask_tokens is None for r in s.rounds], arrays)


def _np(x) -> np.ndarray:
    return np.array(x.detach().cpu() if hasattr(x, "detach") else x)


def _same_snapshot(a, b):
    assert a[:5] == b[:5]
    if a[5] is not None:
        for (k1, v1), (k2, v2) in zip(a[5], b[5]):
            assert np.array_equal(k1, k2) and np.array_equal(v1, v2)


def _memo(fn, key):
    """The real HIPIE stage, computed once per distinct input and replayed (keeps this test to ~3 HIPIE runs)."""
    seen = {}

    def run(*args):
        k = key(*args)
        if k not in seen:
            seen[k] = fn(*args)
        return seen[k]

    return run


def test_a_failure_at_any_stage_leaves_the_session_as_before(golden_model, golden_image, monkeypatch):
    from segllm_edge.runtime import profiler
    from segllm_edge.runtime import session as session_mod

    b = golden_model.backend
    monkeypatch.setattr(b, "mask_backbone", _memo(b.mask_backbone, lambda im: _np(im).tobytes()))
    monkeypatch.setattr(b, "mask_decode", _memo(b.mask_decode, lambda f, c: (id(f[0]), _np(c).tobytes())))
    ref = golden_model.session(golden_image)
    want = [ref.ask(q) for q in GOLDEN_QUESTIONS[:2]]

    s = golden_model.session(golden_image)
    # round 1: fail after the image stages and after the LLM
    for stage in ("preprocess", "mask_backbone", "llm_prefill"):
        monkeypatch.setattr(session_mod, "StageTimer", _fail_after(stage, Injected))
        with pytest.raises(Injected):
            s.ask(GOLDEN_QUESTIONS[0])
        assert s.rounds == [] and s._cache is None and s._image is None
    monkeypatch.setattr(session_mod, "StageTimer", profiler.StageTimer)
    r1 = s.ask(GOLDEN_QUESTIONS[0])
    assert np.array_equal(r1.mask, want[0].mask)

    # round 2: every stage, the last two (post-processing, crop) with KeyboardInterrupt too
    cases = [(st, Injected) for st in ("tokenize", "mask_encoder", "llm_prefill", "seg_head", "mask_decoder",
                                       "postprocess", "crop")] + [("crop", KeyboardInterrupt)]
    before = _snapshot(s)
    for stage, exc in cases:
        monkeypatch.setattr(session_mod, "StageTimer", _fail_after(stage, exc))
        with pytest.raises(exc):
            s.ask(GOLDEN_QUESTIONS[1])
        _same_snapshot(_snapshot(s), before)
    monkeypatch.setattr(session_mod, "StageTimer", profiler.StageTimer)
    r2 = s.ask(GOLDEN_QUESTIONS[1])
    assert np.array_equal(r2.mask, want[1].mask) and np.array_equal(r2.mask_logits, want[1].mask_logits)
    assert s._cache.length == s.context_length == ref.context_length


# -- checkpoints and exports (finding 6, 8) -----------------------------------------------------
def test_config_with_wrong_types(golden_ckpt, tmp_path):
    cfg = json.loads((golden_ckpt / "config.json").read_text())
    cfg["hidden_size"] = str(cfg["hidden_size"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    import segllm_edge

    with pytest.raises(CheckpointError, match="hidden_size='128'.*positive integers"):
        segllm_edge.load(tmp_path)


def test_export_without_tokenizer(tmp_path):
    from segllm_edge.pipeline.tokenizer import SegLLMTokenizer

    with pytest.raises(CheckpointError, match="no tokenizer in"):
        SegLLMTokenizer.from_folder(tmp_path / "tokenizer")


def _fake_export(folder, golden_model):
    from segllm_edge.contracts.manifest import build_manifest

    m = build_manifest(golden_model.info)
    folder.mkdir(parents=True, exist_ok=True)
    m.save(folder)
    for g in m.graphs.values():
        (folder / g.file).write_bytes(b"onnx")
    (folder / "embed_tokens.npy").write_bytes(b"npy")
    (folder / m.tokenizer_dir).mkdir()
    (folder / m.tokenizer_dir / "tokenizer.json").write_text("{}")
    (folder / "config.json").write_text("{}")
    return m


def test_export_force_removes_only_what_an_export_wrote(golden_ckpt, golden_model, tmp_path):
    from segllm_edge.export.onnx_export import export_model, prepare_out_dir

    out = tmp_path / "out"
    _fake_export(out, golden_model)
    (out / "notes.txt").write_text("mine")
    prepare_out_dir(out, golden_ckpt, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    # the output folder is, or contains, the checkpoint: refused, nothing deleted
    holder = tmp_path / "holder"
    ck = holder / "ckpt"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text((golden_ckpt / "config.json").read_text())
    for out_dir in (holder, ck):
        with pytest.raises(CheckpointError, match="the checkpoint"):
            export_model(ck, out_dir, force=True, progress=False)
        assert (ck / "config.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "photo.jpg").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not an earlier export"):
        export_model(golden_ckpt, foreign, force=True, progress=False)
    assert (foreign / "photo.jpg").is_file()


def test_export_force_cli_refuses_one_line(golden_ckpt):
    r = CliRunner().invoke(_main(), ["export", "--checkpoint", str(golden_ckpt), "--out", str(golden_ckpt.parent),
                                     "--force"])
    assert r.exit_code != 0 and "contains the checkpoint" in r.output and "Traceback" not in r.output
    assert (golden_ckpt / "model.safetensors").is_file()


# -- the CLI (finding 9) ------------------------------------------------------------------------
def _main():
    from segllm_edge.cli import main

    return main


def _one_line_error(r, match):
    assert r.exit_code != 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_chat_out_unwritable_fails_before_the_round(golden_ckpt, golden_image, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    r = CliRunner().invoke(_main(), ["chat", "--checkpoint", str(golden_ckpt), "--image", str(golden_image),
                                     "--out", str(blocker / "overlays"), "Segment it."])
    _one_line_error(r, "is not a writable folder")


@pytest.mark.parametrize("args,match", [(["--rounds", "0"], "--rounds must be at least 1"),
                                        (["--repeats", "0"], "--repeats must be at least 1"),
                                        (["--warmup", "-1"], "--warmup must be at least 0")])
def test_bench_bad_counts(args, match, tmp_path):
    r = CliRunner().invoke(_main(), ["bench", "--checkpoint", str(tmp_path), *args])
    _one_line_error(r, match)


def test_every_error_is_a_segllm_error():
    for cls in (ImageError, QuestionError, RoundReferenceError, ConfigError, ContextOverflowError, CheckpointError):
        assert issubclass(cls, SegLLMError)
    assert limits.MAX_QUESTION_BYTES == 8192 and limits.MAX_REFS == 16
