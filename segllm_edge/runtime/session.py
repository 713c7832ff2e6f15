"""A multi-round SegLLM conversation over one image.

Two modes compute the same masks:

* ``reuse=True`` (default): the image is encoded by CLIP and the HIPIE backbone once,
  the LLM's KV cache keeps the conversation, a round prefills only its own tokens,
  only the newest ``<seg>`` is decoded, and each masked crop is CLIP-encoded once,
  the first time a later round refers to it.
* ``reuse=False``: every round recomputes everything the way the research code does
  (whole-conversation tokenization, CLIP on the image and every referenced crop, full
  prefill, HIPIE backbone, HIPIE transformer for every ``<seg>`` so far, keep the last).
  This is the baseline the benchmarks compare against.

A round either completes or leaves the session exactly as it was, whatever fails and
at whichever stage (``KeyboardInterrupt`` included: :mod:`.transaction`), so a session
stays usable after an error.  Inputs are checked against :mod:`segllm_edge.limits` first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .. import limits
from ..errors import ContextOverflowError, QuestionError, RoundReferenceError, SessionError
from ..pipeline.images import clip_preprocess, hipie_preprocess, load_image
from ..pipeline.masks import box_to_original, masked_crop, postprocess_mask
from ..pipeline.selection import mask_row, select_instance
from ..pipeline.tokenizer import round_text, split_refs
from .backend import Backend, concat_rows, editable, host, keep, like, row_index, take_rows
from .profiler import StageTimer
from .results import RoundResult
from .transaction import snapshot

#: HIPIE backbone features (4 levels x 256 channels at 1/8..1/64 of 1024^2, fp32), the normalised 1024^2
#: HIPIE input and the padded uint8 image: what round 1 adds besides the CLIP tokens
IMAGE_STATE_BYTES = 256 * 4 * sum((1024 // s) ** 2 for s in (8, 16, 32, 64)) + 3 * 1024 * 1024 * 4 + 1024 * 1024 * 3


@dataclass
class _Round:
    question: str
    refs: tuple[int, ...]
    ids: list[int]
    result: RoundResult
    crop_pixels: np.ndarray          # (3,224,224) CLIP input of the masked crop
    bbox_vec: np.ndarray             # (4,) [y0,x0,y1,x1]/1024
    mask_tokens: np.ndarray | None = None  # (2,H) once encoded (reuse mode)


@dataclass
class ImageState:
    """What a session keeps of its image: the preprocessed inputs and, once encoded, the image tokens and
    the HIPIE backbone features (the backend's own arrays: they may live on its device)."""

    rgb: np.ndarray                  # original HxWx3 uint8
    clip_pixels: np.ndarray          # (1,3,224,224) float32
    hipie_input: np.ndarray          # (1,3,1024,1024) float32, normalised
    resized_padded: np.ndarray       # (1024,1024,3) uint8
    input_hw: tuple[int, int]
    image_tokens: np.ndarray | None = None     # (1,256,H) float32
    features: list | None = None               # HIPIE backbone levels


class Session:
    def __init__(self, backend: Backend, image, reuse: bool = True, trace: bool = False,
                 max_kv_bytes: int | None = None, max_bytes: int | None = None):
        self.backend = backend
        self.reuse = reuse
        self.trace = trace
        self.max_kv_bytes = max_kv_bytes = limits.check_byte_budget("max_kv_bytes", max_kv_bytes)
        self.max_bytes = limits.check_byte_budget("max_bytes", max_bytes)
        self.rgb = load_image(image)  # raises ImageError before any state exists
        self.rounds: list[_Round] = []
        self._image: ImageState | None = None
        self._cache = None
        self._closed = False
        info = backend.info
        if max_kv_bytes is not None and max_kv_bytes < info.kv_bytes_per_token() * (info.image_tokens + 64):
            raise ContextOverflowError(
                f"max_kv_bytes={max_kv_bytes} cannot hold even the first round "
                f"(~{info.image_tokens + 64} tokens × {info.kv_bytes_per_token()} bytes)")

    # ------------------------------------------------------------------ state
    @property
    def context_length(self) -> int:
        return sum(len(r.ids) for r in self.rounds)

    @property
    def results(self) -> list[RoundResult]:
        return [r.result for r in self.rounds]

    def kv_cache_bytes(self) -> int:
        return self._cache.nbytes() if self._cache is not None else 0

    def state_bytes(self) -> int:
        """Bytes held by this session: KV cache, image features, mask memory."""
        total = self.kv_cache_bytes() + self.rgb.nbytes

        def tb(a):
            return int(a.nbytes) if a is not None else 0  # numpy arrays and torch tensors both have nbytes

        if self._image is not None:
            im = self._image
            total += tb(im.clip_pixels) + tb(im.hipie_input) + im.resized_padded.nbytes + tb(im.image_tokens)
            total += sum(tb(f) for f in im.features or [])
        for r in self.rounds:
            total += tb(r.crop_pixels) + tb(r.bbox_vec) + tb(r.mask_tokens)
            total += r.result.mask.nbytes + r.result.model_mask.nbytes + r.result.mask_logits.nbytes
        return total

    def close(self) -> None:
        self._cache = None
        self._image = None
        self._closed = True

    # ------------------------------------------------------------ validation
    def check_question(self, question, refs) -> tuple[str, tuple[int, ...]]:
        """The question's text and its references (given + inline, merged) as :meth:`ask` takes them, or the
        package's error naming what is wrong — before any model runs."""
        if self._closed:
            raise SessionError("this session is closed")
        limits.check_question(question)                 # type, emptiness, bytes: before any tokenizing
        text, inline = split_refs(question)
        if not text.strip():
            raise QuestionError("the question is empty (it has only references)")
        for tok in self.backend.tokenizer.reserved_tokens():
            if tok in text:
                raise QuestionError(f"the question contains the reserved token {tok!r}")
        given = limits.check_refs(refs)
        merged = given + [r for r in inline if r not in given]
        if len(merged) > limits.MAX_REFS:
            raise RoundReferenceError(f"{len(merged)} references in one round, over the limit of {limits.MAX_REFS}")
        n = len(self.rounds)
        for r in merged:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
                raise RoundReferenceError(f"a reference must be a round number, not {r!r}")
            if not 1 <= r <= n:
                have = f"rounds 1..{n} exist" if n else "no round has been answered yet"
                raise RoundReferenceError(f"round {n + 1} refers to round {r}, but {have}")
            if self.rounds[r - 1].result.empty:
                raise RoundReferenceError(f"round {r} produced an empty mask; there is nothing to refer to")
        return text, tuple(int(r) for r in merged)

    def round_bytes(self, first: bool) -> int:
        """Bytes a round adds to the session state besides its KV cache: its masks (original size and
        1024 frame), logits and crop, plus for round 1 the image state (features, inputs)."""
        h, w = self.rgb.shape[:2]
        size = self.backend.info.clip_image_size
        n = h * w + 1024 * 1024 + 256 * 256 * 4 + 3 * size * size * 4 + 2 * self.backend.info.hidden_size * 4
        if first:
            n += IMAGE_STATE_BYTES + 3 * size * size * 4 + self.backend.info.image_tokens * self.backend.info.hidden_size * 4
        return n

    def _check_budget(self, new_tokens: int, first: bool) -> None:
        if self.max_bytes is None:
            return
        need = (self.state_bytes() + new_tokens * self.backend.info.kv_bytes_per_token() + self.round_bytes(first))
        if need > self.max_bytes:
            h, w = self.rgb.shape[:2]
            raise ContextOverflowError(
                f"round {len(self.rounds) + 1} would bring this session to {need} bytes (KV cache, image state and "
                f"the masks of a {w}x{h} image, {self.round_bytes(False)} bytes per round), over its budget of "
                f"max_bytes={self.max_bytes}; start a new session, downscale the image or raise max_bytes")

    def _check_context(self, total_tokens: int) -> None:
        info = self.backend.info
        if total_tokens > info.max_context:
            raise ContextOverflowError(
                f"the conversation would reach {total_tokens} tokens, over the model's context of {info.max_context}; "
                f"start a new session (rounds so far: {len(self.rounds)})")
        if self.max_kv_bytes is not None:
            need = total_tokens * info.kv_bytes_per_token()
            if need > self.max_kv_bytes:
                raise ContextOverflowError(
                    f"the KV cache would need {need} bytes for {total_tokens} tokens, over this session's budget "
                    f"of {self.max_kv_bytes} bytes; start a new session or raise max_kv_bytes")

    # ---------------------------------------------------------------- stages
    def prepare_image(self, t: StageTimer) -> ImageState:
        """Preprocess this session's image and encode it (image tokens, HIPIE backbone features).

        The hook the round loop calls once per image (every round with ``reuse=False``); a subclass that
        gets the encoded image from elsewhere overrides this one method and returns an :class:`ImageState`
        with ``image_tokens`` and ``features`` set (its stages then differ from a local round's).
        """
        with t.stage("preprocess"):
            clip_pixels = clip_preprocess(self.rgb, self.backend.info.clip_image_size)[None]
            hipie_input, resized, input_hw = hipie_preprocess(self.rgb)
        im = ImageState(self.rgb, clip_pixels, hipie_input, resized, tuple(int(v) for v in input_hw))
        with t.stage("vision_encoder"):
            im.image_tokens = keep(self.backend.encode_image(im.clip_pixels))   # a device stays a device
        with t.stage("mask_backbone"):
            im.features = self.backend.mask_backbone(im.hipie_input)
        return im

    def _mask_tokens(self, refs: tuple[int, ...], t: StageTimer, cached: bool) -> np.ndarray:
        """(2*len(refs), H): mask token then box token for each reference, in order."""
        if not refs:
            return concat_rows([], self.backend.info.hidden_size)
        todo = sorted({r for r in refs if not cached or self.rounds[r - 1].mask_tokens is None})
        if todo:
            with t.stage("mask_encoder"):
                crops = np.stack([self.rounds[r - 1].crop_pixels for r in todo])
                boxes = np.stack([self.rounds[r - 1].bbox_vec for r in todo])
                enc = keep(self.backend.encode_masks(crops, boxes))
            fresh = {r: enc[i] for i, r in enumerate(todo)}
            if cached:
                for r, tok in fresh.items():
                    self.rounds[r - 1].mask_tokens = tok
        else:
            fresh = {}
        rows = [fresh[r] if r in fresh else self.rounds[r - 1].mask_tokens for r in refs]
        return concat_rows(rows, self.backend.info.hidden_size)

    def _embed(self, ids: list[int], extras: np.ndarray) -> np.ndarray:
        """Token embeddings with the placeholder features *added* to the ``<video>`` rows (released quirk)."""
        ids_a = np.asarray(ids, dtype=np.int64)
        emb = editable(self.backend.embed_tokens(ids_a))   # a copy we may add to, on the backend's device
        pos = np.flatnonzero(ids_a == self.backend.info.video_token_id)
        if pos.size != extras.shape[0]:
            raise RuntimeError(f"internal: {pos.size} <video> tokens for {extras.shape[0]} placeholder rows")
        if pos.size:
            emb[row_index(pos, emb)] += like(extras, emb)
        return emb

    # ------------------------------------------------------------------ ask
    def ask(self, question: str, refs=None) -> RoundResult:
        """Run one round. ``refs`` (or an inline ``[REF:k]`` suffix) names earlier rounds by number.

        Transactional: if anything fails (``KeyboardInterrupt`` included) the session is left exactly as before.
        """
        text, refs_t = self.check_question(question, refs)
        saved = snapshot(self)
        try:
            return self._ask(text, refs_t)
        except BaseException:
            saved.restore(self)
            raise

    def _ask(self, text: str, refs_t: tuple[int, ...]) -> RoundResult:
        first = not self.rounds
        t = StageTimer(getattr(self.backend, "sync", None))
        tok = self.backend.tokenizer
        info = self.backend.info
        with t.stage("tokenize"):
            limits.check_question_tokens(tok.count_tokens(text))
            rtext = round_text(text, info.image_tokens, len(refs_t), first)
            if self.reuse:
                new_ids = tok.round_ids(rtext, first)
                all_ids = None
            else:
                all_ids = tok.conversation_ids("".join(_round_texts(self.rounds, info.image_tokens)) + rtext)
                new_ids = all_ids[self.context_length:]
        self._check_context(self.context_length + len(new_ids))
        self._check_budget(len(new_ids), first)
        if self.reuse:
            result_parts = self._run_cached(new_ids, refs_t, first, t)
        else:
            result_parts = self._run_full(all_ids, refs_t, t)
        sel, raw_trace, prefill_tokens = result_parts
        return self._finish(text, refs_t, new_ids, sel, raw_trace, prefill_tokens, t)

    def _run_cached(self, new_ids, refs, first, t):
        if first:
            self._image = self.prepare_image(t)
            self._cache = self.backend.new_cache()
            extras = self._image.image_tokens[0]
        else:
            extras = self._mask_tokens(refs, t, cached=True)
        emb = self._embed(new_ids, extras)
        with t.stage("llm_prefill"):
            hidden = keep(self.backend.llm(emb[None], self._cache))[0]
        seg_pos = _seg_positions(new_ids, self.backend.info.seg_token_id)[-1:]
        return self._decode(hidden, seg_pos, self._image, t, emb)

    def _run_full(self, all_ids, refs, t):
        im = self.prepare_image(t)
        self._image = im
        # every placeholder of the whole conversation, in prompt order: image, then each round's refs
        flat_refs = tuple(r for past in self.rounds[1:] for r in past.refs) + refs
        rows = [im.image_tokens[0], self._mask_tokens(flat_refs, t, cached=False)]
        emb = self._embed(all_ids, concat_rows(rows, self.backend.info.hidden_size))
        with t.stage("llm_prefill"):
            hidden = keep(self.backend.llm(emb[None], None))[0]
        seg_pos = _seg_positions(all_ids, self.backend.info.seg_token_id)
        return self._decode(hidden, seg_pos, im, t, emb)

    def _decode(self, hidden, seg_pos, im: ImageState, t, emb):
        rows = np.asarray(seg_pos) - 1  # the position that predicts <seg>
        with t.stage("seg_head"):
            seg_in = take_rows(hidden, rows)     # the hidden states stay on the backend's device
            cond = self.backend.seg_head(seg_in)
        with t.stage("mask_decoder"):
            raw = self.backend.mask_decode(im.features, cond)
        with t.stage("postprocess"):
            # only the newest <seg>, and of the masks only the selected query's (a device stays a device)
            sel = select_instance({k: host(raw[k][-1:]) for k in ("pred_logits", "pred_boxes", "pred_boxious")})
            sel["mask_logits"] = mask_row(raw["pred_masks"], -1, sel["query_index"])
        trace = None
        if self.trace:
            trace = dict(inputs_embeds=host(emb), hidden=host(hidden), seg_in=host(seg_in), seg_out=_trace(cond),
                         raw={k: _trace(v) for k, v in raw.items()}, selection=sel)
        return sel, trace, emb.shape[0]

    def _finish(self, text, refs, new_ids, sel, trace, prefill_tokens, t) -> RoundResult:
        im = self._image
        with t.stage("postprocess"):
            logits = sel["mask_logits"]
            pp = postprocess_mask(logits, im.input_hw, self.rgb.shape[:2])
            box1024 = sel["box_xyxy"]
            box = box_to_original(box1024, im.input_hw, self.rgb.shape[:2])
        with t.stage("crop"):
            model_mask_np = pp["model_mask"]
            crop, _, bbox_vec = masked_crop(im.resized_padded, model_mask_np, box1024)
            crop_pixels = clip_preprocess(crop, self.backend.info.clip_image_size)
        n = len(self.rounds) + 1
        if trace is not None:
            trace.update(input_ids=[i for r in self.rounds for i in r.ids] + list(new_ids), crop=np.asarray(crop),
                         crop_pixels=crop_pixels, bbox_vec=np.asarray(bbox_vec))
        result = RoundResult(
            round=n, question=text, refs=refs,
            mask=pp["mask"], box=box, model_mask=model_mask_np, model_box=box1024.astype(np.float32),
            mask_logits=logits, score=float(sel["score"]), query_index=int(sel["query_index"]),
            timings=dict(t.ms), new_tokens=int(prefill_tokens),
            context_tokens=self.context_length + len(new_ids), trace=trace,
        )
        self.rounds.append(_Round(text, refs, list(new_ids), result, crop_pixels, bbox_vec))
        if not self.reuse:
            self._image = None  # the research loop keeps nothing between rounds but crops and boxes
        mem = {"kv_cache": self.kv_cache_bytes(), "session_state": self.state_bytes()}
        dev = self.backend.memory_bytes()
        if dev is not None:
            mem["device"] = dev
        result.memory = mem
        return result


def _trace(x):
    """A host copy for the trace, in the backend's own array type (a CPU float tensor for the torch backend)."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu()
    return np.array(x, dtype=np.float32)


def _seg_positions(ids: list[int], seg_id: int) -> list[int]:
    pos = [i for i, v in enumerate(ids) if v == seg_id]
    if not pos:
        raise RuntimeError("internal: no <seg> token in the round")
    return pos


def _round_texts(rounds: list[_Round], image_tokens: int) -> list[str]:
    return [round_text(r.question, image_tokens, len(r.refs), i == 0) for i, r in enumerate(rounds)]
