"""The research code's MRSeg conversation format → `segllm-edge eval`'s multi-round format, on a hand-made file."""
import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from segllm_edge.evaluation.datasets import decode_segmentation, load_dataset
from segllm_edge.evaluation.mrseg import convert_mrseg, decode_target

IMG = "coco/train2014/COCO_train2014_000000000009.jpg"


def _files(tmp_path):
    (tmp_path / "coco" / "train2014").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / IMG)
    from pycocotools import mask as coco_mask

    m = np.zeros((30, 40), np.uint8, order="F")
    m[5:15, 20:30] = 1  # 100 pixels
    rle = coco_mask.encode(m)
    rle["counts"] = rle["counts"].decode()
    instances = {"images": [{"id": 9, "file_name": IMG, "height": 30, "width": 40}],
                 "annotations": [{"id": 101, "image_id": 9, "bbox": [2, 3, 10, 10],
                                  "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]]},
                                 {"id": 202, "image_id": 9, "bbox": [20, 5, 10, 10], "segmentation": rle}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    conv = [
        {"id": "mr-1", "image": IMG, "conversations": [
            {"from": "human", "value": f"<image>\n[IMAGE256:{IMG}] Segment the square on the left."},
            {"from": "gpt", "value": f"[MASK-DECODE:{IMG}|refcoco|101]"},
            {"from": "human", "value": f"[MASK-ENCODE:{IMG}|refcoco|101] [BOX-ENCODE:{IMG}|refcoco|101] "
                                       "Segment the square to the right of it.", "ind": [1]},
            {"from": "gpt", "value": f"[MASK-DECODE:ref:101:202:{IMG}:refcoco]"}]},
        {"id": "mr-2", "image": IMG, "conversations": [
            {"from": "human", "value": "Segment something."},
            {"from": "gpt", "value": f"[MASK-DECODE:{IMG}|lvis|7]"}]},
    ]
    (tmp_path / "mr.json").write_text(json.dumps(conv))
    return tmp_path / "mr.json", {"refcoco": tmp_path / "instances.json"}


def test_decode_target_reads_both_layouts():
    assert decode_target(f"{IMG}|refcoco|101", "x") == ("refcoco", "101")
    assert decode_target(f"ref:101:202:{IMG}:refcoco", "x") == ("refcoco", "202")
    assert decode_target(f"ref:1:2:303:{IMG}:paco_lvis", "x") == ("paco_lvis", "303")


def test_conversion_round_trips_into_the_eval_loader(tmp_path):
    conv, inst = _files(tmp_path)
    out = tmp_path / "eval.json"
    items, problems = convert_mrseg(conv, inst, out)
    assert [i["id"] for i in items] == ["mr-1"]
    assert problems and "conversation 1" in problems[0][0] and "'lvis'" in problems[0][1]  # reported by name
    r1, r2 = items[0]["rounds"]
    assert r1["question"] == "Segment the square on the left." and r1["refs"] == []
    assert r2["question"] == "Segment the square to the right of it." and r2["refs"] == [1]
    assert r1["box"] == [2, 3, 12, 13] and r2["box"] == [20, 5, 30, 15]
    loaded, bad = load_dataset(out)
    assert not bad and len(loaded) == 1 and loaded[0].image == tmp_path / IMG
    masks = [decode_segmentation(r.segmentation, 30, 40) for r in loaded[0].rounds]
    assert masks[1].sum() == 100 and masks[1][5:15, 20:30].all()
    assert masks[0][5, 5] and not masks[0][20, 30] and loaded[0].rounds[1].refs == (1,)


def test_cli_converts_and_names_bad_conversations(tmp_path):
    from segllm_edge.cli import main

    conv, inst = _files(tmp_path)
    res = CliRunner().invoke(main, ["convert-mrseg", str(conv), "--instances", f"refcoco={inst['refcoco']}",
                                    "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert "1 conversation(s), 2 round(s)" in res.output and "1 skipped" in res.output
    assert "no instances file for dataset 'lvis'" in res.output
    bad = CliRunner().invoke(main, ["convert-mrseg", str(conv), "--instances", "refcoco", "--out", "x.json"])
    assert bad.exit_code == 2 and "DATASET=PATH" in bad.output
