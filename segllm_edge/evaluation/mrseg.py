"""The SegLLM research code's own MRSeg conversation files → the multi-round format ``segllm-edge eval`` reads.

The research code (``llava/train/train.py``, ``LazySupervisedDataset``) reads a JSON list of LLaVA-style entries::

    {"image": "coco/train2014/COCO_train2014_000000000001.jpg",
     "conversations": [
       {"from": "human", "value": "[IMAGE256:coco/train2014/...jpg] Segment the man on the left."},
       {"from": "gpt",   "value": "[MASK-DECODE:coco/train2014/...jpg|refcoco|123456]"},
       {"from": "human", "value": "[MASK-ENCODE:...jpg|refcoco|123456] [BOX-ENCODE:...jpg|refcoco|123456] "
                                  "Segment the bag he holds.", "ind": [1]},
       {"from": "gpt",   "value": "[MASK-DECODE:ref:123456:654321:coco/train2014/...jpg|refcoco]"}]}

Human turns carry bracketed inputs (``IMAGE256``, ``MASK-ENCODE``, ``BOX-ENCODE``) around the instruction and, when
they encode earlier masks, ``"ind"``: the 1-based rounds referred to. Each gpt turn's ``MASK-DECODE`` names the target
mask as ``image_file|dataset|mask_id`` or ``task:ref_id[:ref_id_2]:tgt_id:image_file:dataset``; for the COCO-format
datasets (RefCOCO/+/g, LVIS, PACO-LVIS) ``mask_id`` is an annotation id of that dataset's instances file
(``annotations_folder/<dataset>/instances.json``), which is where the masks are read from here too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .datasets import AnnotationError

BRACKET = re.compile(r"\[(IMAGE256|MASK-ENCODE|BOX-ENCODE|MASK-DECODE):([^\]]*)\]")
ENCODE_KINDS = ("MASK-ENCODE", "BOX-ENCODE")


def decode_target(spec: str, what: str) -> tuple[str, str]:
    """(dataset, mask id) of a ``MASK-DECODE`` payload in either of the research code's two layouts."""
    if "|" in spec and ":" not in spec:
        parts = spec.split("|")
        if len(parts) == 3:
            return parts[1], parts[2]
    else:
        parts = spec.split(":")
        if len(parts) in (5, 6):  # task:ref:tgt:image:dataset / task:ref:ref2:tgt:image:dataset
            return parts[-1], parts[-3]
    raise AnnotationError(f"{what}: cannot read the MASK-DECODE target {spec!r} (expected image|dataset|mask_id or "
                          "task:ref_id:tgt_id:image:dataset)")


def _question(value: str) -> str:
    text = BRACKET.sub(" ", value).replace("<image>", " ")
    return " ".join(text.split())


class _Instances:
    """COCO-format instance files by dataset name, read once each, annotations by id."""

    def __init__(self, files: dict[str, Path]):
        self.files, self._anns = {k: Path(v) for k, v in files.items()}, {}

    def get(self, dataset: str, mask_id: str, what: str) -> dict:
        if dataset not in self.files:
            raise AnnotationError(f"{what}: no instances file for dataset {dataset!r} (give "
                                  f"--instances {dataset}=PATH; known: {', '.join(sorted(self.files)) or 'none'})")
        if dataset not in self._anns:
            try:
                data = json.loads(self.files[dataset].read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise AnnotationError(f"cannot read instances file {self.files[dataset]}: {exc}") from None
            self._anns[dataset] = {str(a["id"]): a for a in data.get("annotations", [])}
        ann = self._anns[dataset].get(str(mask_id).strip())
        if ann is None:
            raise AnnotationError(f"{what}: annotation {mask_id} is not in {self.files[dataset]}")
        return ann


def convert_entry(entry: dict, index: int, instances: _Instances) -> dict:
    name = str(entry.get("id", entry.get("image", f"#{index}")))
    what = f"conversation {index} ({name})"
    if not isinstance(entry, dict) or "image" not in entry or not isinstance(entry.get("conversations"), list):
        raise AnnotationError(f"{what}: needs 'image' and a 'conversations' list")
    turns = entry["conversations"]
    if len(turns) % 2 or not turns:
        raise AnnotationError(f"{what}: {len(turns)} turns; expected human/gpt pairs")
    rounds = []
    for r in range(len(turns) // 2):
        human, gpt = turns[2 * r], turns[2 * r + 1]
        rw = f"{what} round {r + 1}"
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise AnnotationError(f"{rw}: turns must alternate human, gpt")
        kinds = {k for k, _ in BRACKET.findall(human.get("value", ""))}
        refs = [int(i) for i in human.get("ind", [])] if kinds & set(ENCODE_KINDS) else []
        if kinds & set(ENCODE_KINDS) and not refs:
            raise AnnotationError(f"{rw}: encodes an earlier mask but has no 'ind' (the rounds it refers to)")
        bad = [i for i in refs if not 1 <= i <= r]
        if bad:
            raise AnnotationError(f"{rw}: 'ind' {bad} does not name an earlier round")
        targets = [p for k, p in BRACKET.findall(gpt.get("value", "")) if k == "MASK-DECODE"]
        if len(targets) != 1:
            raise AnnotationError(f"{rw}: the answer has {len(targets)} MASK-DECODE targets; expected one")
        dataset, mask_id = decode_target(targets[0], rw)
        ann = instances.get(dataset, mask_id, rw)
        x, y, w, h = ann.get("bbox", [None] * 4) if ann.get("bbox") else [None] * 4
        row = {"question": _question(human.get("value", "")), "refs": refs, "mask": ann["segmentation"],
               "source": {"dataset": dataset, "mask_id": mask_id}}
        if x is not None:
            row["box"] = [x, y, x + w, y + h]
        rounds.append(row)
    return {"id": name, "image": entry["image"], "rounds": rounds}


def convert_mrseg(conversations: Path, instances: dict[str, Path], out: Path | None = None
                  ) -> tuple[list[dict], list[tuple[str, str]]]:
    """Convert a research-code conversation file; returns (converted items, [(item, problem)]) and writes
    ``out`` (the eval's multi-round JSON) when given. A bad entry is reported by name and skipped."""
    try:
        entries = json.loads(Path(conversations).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"cannot read {conversations}: {exc}") from None
    if not isinstance(entries, list):
        raise AnnotationError(f"{conversations}: expected a JSON list of conversations")
    inst = _Instances(instances)
    items, problems = [], []
    for i, e in enumerate(entries):
        try:
            items.append(convert_entry(e, i, inst))
        except AnnotationError as exc:
            problems.append((f"conversation {i}", str(exc)))
    if out is not None:
        Path(out).write_text(json.dumps(items, indent=1))
    return items, problems
