"""``segllm-edge eval``: dataset readers (RLE, polygons, PNG masks, bad items named), resuming, and one small
end-to-end run on the golden export against the research code's masks."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as coco_mask

from segllm_edge.cli import main
from segllm_edge.evaluation.datasets import AnnotationError, decode_segmentation, load_dataset
from segllm_edge.evaluation.runner import ROUNDS_FILE, run_eval


def _rle(mask: np.ndarray) -> dict:
    r = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode()}


def test_decode_rle_polygons_and_png(tmp_path):
    m = np.zeros((6, 8), bool)
    m[1:3, 2:7] = True
    assert (decode_segmentation(_rle(m), 6, 8) == m).all()
    poly = decode_segmentation([[1, 1, 5, 1, 5, 4, 1, 4]], 8, 8)
    assert poly.sum() == 12 and poly[1:4, 1:5].all()  # pycocotools' rasterisation of that rectangle
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.png")
    assert (decode_segmentation("m.png", 6, 8, tmp_path) == m).all()
    with pytest.raises(AnnotationError, match="RLE size \\[6, 8\\] differs from the image's \\[8, 8\\]"):
        decode_segmentation(_rle(m), 8, 8)
    with pytest.raises(AnnotationError, match="mask file .* is 8x6, the image 8x8"):
        decode_segmentation("m.png", 8, 8, tmp_path)
    with pytest.raises(AnnotationError, match="must be an RLE dict, a list of polygons"):
        decode_segmentation([[1, 2]], 8, 8)


def test_bad_items_are_named_and_the_rest_is_read(tmp_path):
    good = {"id": "ok", "image": "a.png", "rounds": [{"question": "Segment it.", "mask": [[0, 0, 2, 0, 2, 2]]},
                                                    {"question": "And that.", "refs": [1], "mask": [[0, 0, 2, 0, 2, 2]]}]}
    data = [good, {"id": "noimg", "rounds": good["rounds"]},
            {"id": "badref", "image": "a.png", "rounds": [{"question": "x", "refs": [1], "mask": []}]},
            {"id": "nomask", "image": "a.png", "rounds": [{"question": "x"}]}]
    (tmp_path / "d.json").write_text(json.dumps(data))
    items, problems = load_dataset(tmp_path / "d.json")
    assert [c.id for c in items] == ["ok"] and items[0].rounds[1].refs == (1,)
    assert dict(problems) == {"conversation noimg": "needs 'image' and a non-empty 'rounds' list",
                              "conversation badref": "round 1 refers to rounds [1]; only 1..0 come before it",
                              "conversation nomask": "round 1 needs a 'question' string and a 'mask'"}
    coco = {"images": [{"id": 7, "file_name": "a.png", "height": 8, "width": 8}],
            "annotations": [{"id": 3, "image_id": 7, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]], "bbox": [1, 1, 4, 3]}],
            "refs": [{"ref_id": 1, "ann_id": 3, "image_id": 7, "sentences": [{"sent": "the box"}, {"sent": " "}]},
                     {"ref_id": 2, "ann_id": 99, "image_id": 7, "sentences": [{"sent": "x"}]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    items, problems = load_dataset(tmp_path / "c.json", template="Segment {sentence}.")
    assert [(c.id, c.rounds[0].question, c.rounds[0].box) for c in items] == [("1.0", "Segment the box.", (1, 1, 5, 4))]
    assert [n for n, _ in problems] == ["ref 1 sentence 1", "ref 2"]


@pytest.fixture(scope="module")
def golden_dataset(golden_image, golden_rounds, tmp_path_factory):
    """A two-round conversation on the golden image whose ground truth is the research code's masks (1024 frame,
    cut to the image and resized to 640x480) and boxes, and one conversation with a missing image."""
    folder = tmp_path_factory.mktemp("evaldata")
    shutil.copyfile(golden_image, folder / "img.png")
    w, h = Image.open(golden_image).size
    side = 1024 * np.array([h, w]) // max(h, w)

    def gt(r):
        m = golden_rounds[r]["final_mask"][: side[0], : side[1]]
        return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127

    def box(r):  # the research code's box, 1024 frame → image pixels, clipped to the image
        b = golden_rounds[r]["final_box"] * max(h, w) / 1024
        return [float(np.clip(b[0], 0, w)), float(np.clip(b[1], 0, h)), float(np.clip(b[2], 0, w)), float(np.clip(b[3], 0, h))]

    Image.fromarray(gt(2).astype(np.uint8) * 255).save(folder / "r2.png")
    rounds = [{"question": "Segment the red circle.", "mask": _rle(gt(1)), "box": box(1)},
              {"question": "Segment the blue square next to it.", "refs": [1], "mask": "r2.png", "box": box(2)}]
    data = [{"id": "a", "image": "img.png", "rounds": rounds}, {"id": "lost", "image": "missing.png", "rounds": rounds[:1]}]
    (folder / "mr.json").write_text(json.dumps(data))
    return folder / "mr.json"


def test_eval_end_to_end_on_the_golden_export(golden_export, golden_dataset, tmp_path):
    out = tmp_path / "res"
    res = CliRunner().invoke(main, ["eval", "--data", str(golden_dataset), "--model", str(golden_export),
                                                    "--out", str(out)])
    assert res.exit_code == 0, res.output + res.stderr
    assert "bad annotation: lost: image" in res.stderr and "missing.png does not exist" in res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    (label, m), = metrics.items()
    assert m["conversations"] == 1 and [p["id"] for p in m["problems"]] == ["lost"]
    r1, r2 = m["rounds"]
    assert (r1["n"], r2["n"]) == (1, 1)
    for r in (r1, r2):  # the onnxruntime export against the research code's masks
        assert r["gIoU"] > 0.95 and r["cIoU"] > 0.95 and r["P@0.5"] == 1.0
    assert "gIoU   cIoU   P@0.5" in res.stdout and (out / "metrics.png").stat().st_size > 0
    # resumable: everything is done, so a rerun needs no model at all and gives the same metrics
    items, problems = load_dataset(golden_dataset)
    assert run_eval(None, items, out / label, problems, progress=False)["rounds"] == m["rounds"]
    # an interrupted run (last line cut short) re-runs only that conversation
    (line,) = (out / label / ROUNDS_FILE).read_text().splitlines()
    (out / label / ROUNDS_FILE).write_text(line[:10])
    with pytest.raises(AttributeError):  # it tries to run conversation "a" again (no model given)
        run_eval(None, items, out / label, problems, progress=False)
