"""Evaluation datasets: multi-round conversations (MRSeg-style) and RefCOCO-style single-round annotations.

Both read into :class:`Conversation` items: an image, and per round a question, the rounds it refers to
and the ground-truth mask (decoded lazily, at the image's size).

* **Multi-round** (``.json``): a list of conversations
  ``{"id", "image", "rounds": [{"question", "refs": [1, ...], "mask": <segmentation>}, ...]}``; ``image`` is
  relative to ``image_root`` (default: the JSON's folder); references are 1-based round numbers, as in the
  session API (the research code's ``[REF:n]`` suffix works too); an optional ``"box": [x0, y0, x1, y1]``
  (image pixels) is the ground-truth box for P@0.5, else the box around the mask.
* **RefCOCO-style** (``.json``): COCO instances (``images``, ``annotations`` with ``segmentation``) plus a
  ``refs`` list ``{"ref_id", "ann_id", "image_id", "sentences": [{"sent": ...}]}`` (the REFER toolkit's
  fields; an annotation's COCO ``bbox`` is the ground-truth box); every sentence is one single-round item, asked as ``template.format(sentence=...)``.

A segmentation is a COCO RLE (``{"size": [h, w], "counts": str|list}``), COCO polygons (a list of
``[x0, y0, x1, y1, ...]``) or a path to a PNG mask (non-zero = object). Problems are :class:`AnnotationError`
naming the item; the runner reports them by name and goes on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SegLLMError


class AnnotationError(SegLLMError):
    """An evaluation item is malformed (missing field, undecodable mask, missing image)."""


@dataclass(frozen=True)
class EvalRound:
    question: str
    refs: tuple[int, ...]
    segmentation: object            # RLE dict, polygons, or a PNG path (str)
    box: tuple | None = None        # ground-truth xyxy box in image pixels (None: the box around the mask)


@dataclass(frozen=True)
class Conversation:
    id: str
    image: Path
    rounds: tuple[EvalRound, ...]
    source: dict = field(default_factory=dict, compare=False)


def decode_segmentation(seg, height: int, width: int, root: Path | None = None, what: str = "mask") -> np.ndarray:
    """A boolean HxW mask from an RLE, polygons or a PNG path."""
    if isinstance(seg, str):
        from PIL import Image

        p = Path(seg) if root is None else Path(root) / seg
        try:
            m = np.asarray(Image.open(p).convert("L")) > 0
        except (OSError, ValueError) as exc:
            raise AnnotationError(f"{what}: cannot read mask file {p}: {exc}") from None
        if m.shape != (height, width):
            raise AnnotationError(f"{what}: mask file {p} is {m.shape[1]}x{m.shape[0]}, the image {width}x{height}")
        return m
    from pycocotools import mask as coco_mask

    try:
        if isinstance(seg, dict):
            if list(seg.get("size", [])) != [height, width]:
                raise AnnotationError(f"{what}: RLE size {seg.get('size')} differs from the image's [{height}, {width}]")
            rle = coco_mask.frPyObjects(seg, height, width) if isinstance(seg.get("counts"), list) else \
                {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}
            return coco_mask.decode(rle).astype(bool)
        if isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            rles = coco_mask.frPyObjects(seg, height, width)
            return coco_mask.decode(coco_mask.merge(rles)).astype(bool)
    except AnnotationError:
        raise
    except Exception as exc:  # pycocotools raises plain exceptions for corrupt counts
        raise AnnotationError(f"{what}: cannot decode the segmentation: {exc}") from None
    raise AnnotationError(f"{what}: a segmentation must be an RLE dict, a list of polygons (>= 3 points each) "
                          f"or a mask file path, got {type(seg).__name__}")


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"cannot read the annotation file {path}: {exc}") from None


def load_dataset(path, image_root=None, template: str = "{sentence}") -> tuple[list[Conversation], list[tuple[str, str]]]:
    """(items, problems): the items that parse, and (name, reason) for each item that does not."""
    path = Path(path)
    data = _read_json(path)
    root = Path(image_root) if image_root else path.parent
    if isinstance(data, dict) and "refs" in data:
        return _refcoco(data, root, template)
    if isinstance(data, list):
        return _multi_round(data, root)
    raise AnnotationError(f"{path}: expected a list of conversations or a COCO file with a 'refs' list")


def _multi_round(data: list, root: Path):
    items, problems = [], []
    for i, c in enumerate(data):
        cid = str(c.get("id", i)) if isinstance(c, dict) else str(i)
        try:
            if not isinstance(c, dict) or not c.get("image") or not c.get("rounds"):
                raise AnnotationError("needs 'image' and a non-empty 'rounds' list")
            rounds = []
            for r, rd in enumerate(c["rounds"], 1):
                if not isinstance(rd, dict) or not isinstance(rd.get("question"), str) or "mask" not in rd:
                    raise AnnotationError(f"round {r} needs a 'question' string and a 'mask'")
                refs = tuple(int(x) for x in rd.get("refs", ()))
                if any(not 1 <= x < r for x in refs):
                    raise AnnotationError(f"round {r} refers to rounds {list(refs)}; only 1..{r - 1} come before it")
                box = rd.get("box")
                if box is not None and (len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]):
                    raise AnnotationError(f"round {r} box {box} is not [x0, y0, x1, y1] with x1 > x0, y1 > y0")
                rounds.append(EvalRound(rd["question"], refs, rd["mask"], tuple(map(float, box)) if box else None))
            items.append(Conversation(cid, root / c["image"], tuple(rounds)))
        except (AnnotationError, TypeError, ValueError) as exc:
            problems.append((f"conversation {cid}", str(exc)))
    return items, problems


def _refcoco(data: dict, root: Path, template: str):
    items, problems = [], []
    images = {im["id"]: im for im in data.get("images", [])}
    anns = {a["id"]: a for a in data.get("annotations", [])}
    for ref in data["refs"]:
        rid = str(ref.get("ref_id", ref.get("ann_id")))
        ann, im = anns.get(ref.get("ann_id")), images.get(ref.get("image_id"))
        if ann is None or im is None:
            problems.append((f"ref {rid}", f"annotation {ref.get('ann_id')} or image {ref.get('image_id')} is not in the file"))
            continue
        for k, s in enumerate(ref.get("sentences", [])):
            sent = s.get("sent") if isinstance(s, dict) else s
            if not isinstance(sent, str) or not sent.strip():
                problems.append((f"ref {rid} sentence {k}", "empty sentence"))
                continue
            bx = ann.get("bbox")  # COCO xywh
            box = (bx[0], bx[1], bx[0] + bx[2], bx[1] + bx[3]) if bx and len(bx) == 4 else None
            items.append(Conversation(f"{rid}.{k}", root / im["file_name"],
                                      (EvalRound(template.format(sentence=sent.strip()), (), ann["segmentation"], box),),
                                      {"height": im.get("height"), "width": im.get("width")}))
    return items, problems
