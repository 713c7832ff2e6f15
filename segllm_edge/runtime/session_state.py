"""Save a :class:`~segllm_edge.runtime.session.Session` to bytes and restore it, on any backend.

What is saved is the conversation's *durable part*: the image (its encoded bytes), and per round the
question, references, token ids, the masks (bit-packed), boxes, score, the crop box and -- once a later
round referred to it -- the round's mask tokens; for the last round also its (256, 256) mask logits (256 KiB),
so that a retried last round is answered again in full (the memory figures each round reported are in
``meta``).  Not the KV cache, the image features or the crop
pixels: :func:`restore_session` encodes the image again, rebuilds the KV cache of every round with
ONE prefill over the whole conversation and recomputes each crop from its mask and box; the mask
decoder never runs for an old round.  The next round of a restored session is the round an
uninterrupted session would have answered (same token ids; the KV cache differs only by the float
rounding of one prefill against several).

Layout of a saved state (all integers little-endian)::

    b"SEGLLMST"  u16 format version  u32 rounds  u64 body length  32 bytes sha256(body)  body

``body`` is an ``.npz`` archive (the image stored, the rest deflated; numpy only, loaded with ``allow_pickle=False``): ``meta`` (JSON:
identity, questions, refs, scores ...), ``image`` and the per-round arrays.  The fixed header lets a
store read a state's round count without reading the state (:func:`peek_rounds`).

The state names the model it belongs to (:func:`model_identity`): the architecture (``ModelInfo``),
a hash of token-embedding rows every backend computes the same way, and for an export folder a
fingerprint of its manifest, tokenizer and graph files.  Restoring onto another model or export
raises :class:`~segllm_edge.errors.SessionStateError`, and so does a truncated, corrupt or
unknown-version state -- before any model runs.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import time
import weakref
from pathlib import Path

import numpy as np

from ..errors import SessionStateError
from ..pipeline.images import clip_preprocess, hipie_preprocess, read_image
from ..pipeline.masks import FRAME, masked_crop
from .backend import concat_rows, host
from .profiler import StageTimer
from .results import RoundResult

MAGIC = b"SEGLLMST"
#: bumped whenever the layout or the meaning of a field changes; other versions are refused
STATE_FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHIQ32s")
HEADER_BYTES = _HEADER.size
#: token ids whose embeddings fingerprint the weights (plus the model's special tokens)
_PROBE_IDS = 64
_SAMPLE_BLOCKS, _BLOCK = 32, 1 << 16

_identity_cache: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
_image_cache: "weakref.WeakKeyDictionary[object, bytes]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# identity
# --------------------------------------------------------------------------------------------
def _file_sample_hash(h, path: Path) -> None:
    """Size and evenly spaced 64 KiB blocks of ``path`` (the whole file when it is small)."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as f:
        if size <= _SAMPLE_BLOCKS * _BLOCK:
            h.update(f.read())
            return
        step = (size - _BLOCK) // (_SAMPLE_BLOCKS - 1)
        for i in range(_SAMPLE_BLOCKS):
            f.seek(i * step)
            h.update(f.read(_BLOCK))


def export_fingerprint(folder: str | Path) -> str | None:
    """A fingerprint of an export folder's content (manifest, tokenizer, graphs, arrays), independent of its
    path: two copies of one export agree, a re-export or another precision does not. None for a folder
    without a manifest."""
    from ..contracts.manifest import MANIFEST_NAME, Manifest

    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        return None
    manifest = Manifest.load(folder)
    h = hashlib.sha256((folder / MANIFEST_NAME).read_bytes())
    tok = folder / manifest.tokenizer_dir
    for p in sorted(tok.rglob("*")) if tok.is_dir() else []:
        if p.is_file():
            _file_sample_hash(h, p)
    files = [g.file for g in manifest.graphs.values()] + sorted(manifest.arrays.values())
    for name in files:
        for p in (folder / name, folder / f"{name}.data"):
            if p.is_file():
                _file_sample_hash(h, p)
    return h.hexdigest()


def model_identity(backend) -> dict:
    """What a saved state records of the model it belongs to (computed once per backend object)."""
    try:
        return _identity_cache[backend]
    except (KeyError, TypeError):
        pass
    info = backend.info
    ids = np.unique(np.concatenate([np.arange(min(_PROBE_IDS, info.vocab_size)),
                                    [info.video_token_id, info.seg_token_id, info.eos_token_id]])).astype(np.int64)
    emb = np.ascontiguousarray(host(backend.embed_tokens(ids)), dtype=np.float32)
    folder = getattr(backend, "folder", None)
    ident = {"model": {k: getattr(info, k) for k in info.__dataclass_fields__},
             "embeddings": hashlib.sha256(emb.tobytes()).hexdigest(),
             "export": export_fingerprint(folder) if folder is not None else None}
    try:
        _identity_cache[backend] = ident
    except TypeError:
        pass
    return ident


def check_identity(saved: dict, backend) -> None:
    """SessionStateError unless ``saved`` (a state's identity) names the model ``backend`` runs."""
    have = model_identity(backend)
    diff = [k for k, v in saved.get("model", {}).items() if have["model"].get(k) != v]
    if diff or set(saved.get("model", {})) != set(have["model"]):
        what = ", ".join(f"{k}={saved['model'].get(k)!r} vs {have['model'].get(k)!r}" for k in diff[:4])
        raise SessionStateError(f"this saved conversation belongs to another model ({what or 'other fields'}); "
                                "restore it on the model/export that saved it")
    if saved.get("embeddings") != have["embeddings"]:
        raise SessionStateError("this saved conversation belongs to another model: same architecture, other weights "
                                "(token embeddings differ); restore it on the model/export that saved it")
    if saved.get("export") and have["export"] and saved["export"] != have["export"]:
        raise SessionStateError(f"this saved conversation belongs to another export (fingerprint "
                                f"{saved['export'][:12]} vs {have['export'][:12]} of "
                                f"{getattr(backend, 'folder', '?')}): restore it on the export that saved it")


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------
def _image_bytes(session) -> bytes:
    """The encoded image to store: the bytes the session was opened with (the BLS keeps them as
    ``payload``), else a lossless PNG of its RGB array (made once per session)."""
    payload = getattr(session, "payload", None)
    if isinstance(payload, (bytes, bytearray)) and payload:
        return bytes(payload)
    try:
        return _image_cache[session]
    except KeyError:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(session.rgb).save(buf, format="PNG", compress_level=1)
        _image_cache[session] = buf.getvalue()
        return _image_cache[session]


def save_session(session) -> bytes:
    """The durable part of ``session`` as bytes (see the module's docstring for the layout)."""
    arrays: dict[str, np.ndarray] = {"image": np.frombuffer(_image_bytes(session), dtype=np.uint8)}
    rounds = []
    for i, r in enumerate(session.rounds):
        res = r.result
        p = f"r{i}_"
        arrays[p + "ids"] = np.asarray(r.ids, dtype=np.int32)
        arrays[p + "mask"] = np.packbits(np.asarray(res.mask, dtype=bool))
        arrays[p + "model_mask"] = np.packbits(np.asarray(res.model_mask, dtype=bool))
        arrays[p + "box"] = np.asarray(res.box, dtype=np.float32).reshape(4)
        arrays[p + "model_box"] = np.asarray(res.model_box, dtype=np.float32).reshape(4)
        arrays[p + "bbox_vec"] = np.asarray(r.bbox_vec, dtype=np.float32).reshape(4)
        if r.mask_tokens is not None:
            arrays[p + "mask_tokens"] = np.asarray(host(r.mask_tokens), dtype=np.float32)
        if i == len(session.rounds) - 1 and np.size(res.mask_logits):   # a replay of the last round answers all
            arrays[p + "mask_logits"] = np.asarray(host(res.mask_logits), dtype=np.float32)
        rounds.append({"question": r.question, "refs": list(r.refs), "score": float(res.score),
                       "query_index": int(res.query_index), "new_tokens": int(res.new_tokens),
                       "context_tokens": int(res.context_tokens),
                       "memory": {k: int(v) for k, v in res.memory.items()}})
    meta = {"identity": model_identity(session.backend), "reuse": bool(session.reuse),
            "image_hw": list(session.rgb.shape[:2]), "rounds": rounds, "saved_at": time.time()}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    body = _npz(arrays)
    return _HEADER.pack(MAGIC, STATE_FORMAT_VERSION, len(rounds), len(body), hashlib.sha256(body).digest()) + body


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (what ``np.load`` reads) with the encoded image stored as is and the rest deflated
    (bit-packed masks are mostly zeros; compressing the PNG/JPEG again would only cost time)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, a in arrays.items():
            zi = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_STORED if name == "image" else zipfile.ZIP_DEFLATED
            with zf.open(zi, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# read
# --------------------------------------------------------------------------------------------
def peek_rounds(head: bytes) -> int:
    """The round count of a state from its first :data:`HEADER_BYTES` bytes (SessionStateError if they are
    not a state's header)."""
    if len(head) < HEADER_BYTES:
        raise SessionStateError(f"the stored conversation state is truncated ({len(head)} bytes, not even a header)")
    magic, version, n, _, _ = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise SessionStateError("the stored data is not a segllm-edge conversation state (bad magic)")
    if version != STATE_FORMAT_VERSION:
        raise SessionStateError(f"the stored conversation state has format version {version}; this segllm-edge "
                                f"reads version {STATE_FORMAT_VERSION}")
    return n


def read_state(blob: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of a saved state, after checking its header, length and checksum."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SessionStateError(f"a conversation state is bytes, not {type(blob).__name__}")
    blob = bytes(blob)
    n = peek_rounds(blob[:HEADER_BYTES])
    _, _, _, length, digest = _HEADER.unpack_from(blob)
    body = blob[HEADER_BYTES:]
    if len(body) != length:
        raise SessionStateError(f"the stored conversation state is truncated or padded: {len(body)} bytes of body, "
                                f"its header says {length}")
    if hashlib.sha256(body).digest() != digest:
        raise SessionStateError("the stored conversation state is corrupt (checksum mismatch)")
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes())
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise SessionStateError(f"the stored conversation state cannot be read: {exc}") from None
    if len(meta.get("rounds", ())) != n:
        raise SessionStateError("the stored conversation state is inconsistent (round counts differ)")
    return meta, arrays


# --------------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------------
def _default_factory(backend, **session_kw):
    def make(image: bytes, reuse: bool):
        from .session import Session

        rgb = read_image(io.BytesIO(image), "the stored conversation's image")
        return Session(backend, rgb, reuse=reuse, **session_kw)

    return make


def restore_session(blob: bytes, backend, make_session=None, **session_kw):
    """A session that continues the conversation saved in ``blob``, on ``backend``.

    ``make_session(image_bytes, reuse)`` opens the empty session to fill (default: a plain
    :class:`~segllm_edge.runtime.session.Session` with ``session_kw``; the Triton BLS passes its own).
    The image is encoded once and the KV cache of every round rebuilt with one prefill; the timings
    of that work are on the returned session's ``restore_timings`` (ms per stage).
    """
    from .session import _Round

    t = StageTimer(getattr(backend, "sync", None))
    with t.stage("restore_parse"):
        meta, arrays = read_state(blob)
        check_identity(meta.get("identity", {}), backend)
        session = (make_session or _default_factory(backend, **session_kw))(arrays["image"].tobytes(),
                                                                             bool(meta["reuse"]))
        h, w = session.rgb.shape[:2]
        if [h, w] != list(meta["image_hw"]):
            raise SessionStateError(f"the stored image decodes to {w}x{h}, the state says "
                                    f"{meta['image_hw'][1]}x{meta['image_hw'][0]}")
    if not meta["rounds"]:
        session.restore_timings = dict(t.ms)
        return session
    if session.reuse:
        im = session.prepare_image(t)          # the image tokens and the HIPIE features, once
        resized = im.resized_padded
    else:
        im = None
        resized = hipie_preprocess(session.rgb)[1]
    size = backend.info.clip_image_size
    with t.stage("restore_rounds"):
        for i, rm in enumerate(meta["rounds"]):
            p = f"r{i}_"
            model_mask = np.unpackbits(arrays[p + "model_mask"], count=FRAME * FRAME).astype(bool).reshape(FRAME, FRAME)
            mask = np.unpackbits(arrays[p + "mask"], count=h * w).astype(bool).reshape(h, w)
            bbox_vec = arrays[p + "bbox_vec"].astype(np.float32)
            y0, x0, y1, x1 = (int(round(float(v) * FRAME)) for v in bbox_vec)
            crop, _, again = masked_crop(resized, model_mask, (x0, y0, x1, y1))
            if not np.array_equal(again, bbox_vec):
                raise SessionStateError(f"round {i + 1} of the stored conversation has an unusable crop box")
            result = RoundResult(
                round=i + 1, question=rm["question"], refs=tuple(rm["refs"]), mask=mask,
                box=arrays[p + "box"], model_mask=model_mask, model_box=arrays[p + "model_box"],
                mask_logits=arrays.get(p + "mask_logits", np.zeros((0, 0), np.float32)),
                score=rm["score"], query_index=rm["query_index"],
                timings={}, new_tokens=rm["new_tokens"], context_tokens=rm["context_tokens"],
                memory=dict(rm.get("memory", {})))
            tokens = arrays.get(p + "mask_tokens")
            session.rounds.append(_Round(rm["question"], tuple(rm["refs"]), [int(v) for v in arrays[p + "ids"]],
                                         result, clip_preprocess(crop, size), bbox_vec, tokens))
    if session.reuse:
        _rebuild_cache(session, im, t)
    session.restore_timings = dict(t.ms)
    return session


def _rebuild_cache(session, im, t) -> None:
    """The KV cache of the whole conversation from one prefill: the image tokens on round 1's placeholders,
    each later round's referenced mask tokens (stored; encoded now only where the state lacks them) on its own."""
    session._check_context(session.context_length)
    rows = [im.image_tokens[0]]
    for r in session.rounds[1:]:
        rows.append(session._mask_tokens(r.refs, t, cached=True))
    ids = [i for r in session.rounds for i in r.ids]
    emb = session._embed(ids, concat_rows(rows, session.backend.info.hidden_size))
    cache = session.backend.new_cache()
    with t.stage("llm_prefill"):
        session.backend.llm(emb[None], cache)
    if cache.length != len(ids):
        raise SessionStateError(f"internal: the rebuilt KV cache holds {cache.length} tokens, not {len(ids)}")
    session._image, session._cache = im, cache


__all__ = ["save_session", "restore_session", "read_state", "peek_rounds", "model_identity", "export_fingerprint",
           "check_identity", "STATE_FORMAT_VERSION", "HEADER_BYTES"]
