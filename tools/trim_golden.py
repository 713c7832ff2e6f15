"""Copy the arrays the fidelity tests check from the reference-run fixture into tests/golden/ (trimmed).

usage: python tools/trim_golden.py ../shared/golden tests/golden
Users of the package don't have ../shared; the tests read only what this writes.
"""
import sys
from pathlib import Path

import numpy as np

KEEP = [
    "input_ids", "video_token_positions", "seg_token_positions", "mask_encode_ref",
    "image_encode_pixel_values", "image_clip_patch_features", "mask_encode_clip_cls_feature",
    "llm_inputs_embeds", "llm_last_hidden_state", "seg_predictor_in", "seg_predictor_out",
    "hipie_raw_pred_logits", "hipie_raw_pred_boxes", "hipie_raw_pred_boxious",
    "selected_fg_query_id_last", "selected_query_mask_logits_256", "final_box", "final_boxes_all_segs",
    "next_crop_box_x0y0x1y1_int", "next_bbox_encode", "masked_crop_uint8", "hipie_input_size",
]
PACK = ["final_mask"]  # 1024x1024 bool → packbits


def main(src: str, dst: str) -> None:
    src_p, dst_p = Path(src), Path(dst)
    out = {}
    for r in (1, 2, 3):
        g = np.load(src_p / f"golden_shapes_a_round{r}.npz")
        for k in KEEP:
            if k in g.files:
                out[f"r{r}/{k}"] = g[k]
        for k in PACK:
            out[f"r{r}/{k}_packed"] = np.packbits(g[k].astype(bool))
    np.savez_compressed(dst_p / "rounds.npz", **out)
    print(f"wrote {dst_p / 'rounds.npz'} ({(dst_p / 'rounds.npz').stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
