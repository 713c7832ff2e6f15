"""HIPIE-R50 mask decoder of SegLLM (image-level, MaskDINO disabled), inference only.

Module tree mirrors the research code so ``state_dict()`` keys equal the checkpoint's ``model.segmentator.hipie.*``
keys with that prefix stripped (minus IGNORED_KEY_PATTERNS):
    detr.detr.backbone.0.backbone.*      ResNet-50 (detectron2, FrozenBN)
    detr.detr.input_proj.{0..3}          conv + GroupNorm(32) per level
    detr.detr.transformer.*              fusion + encoder + two-stage + decoder
    detr.detr.{class_embed,bbox_embed}.{0..6} (== detr.detr.transformer.decoder.{...}: the same module objects)
    detr.detr.iou_head.{0..5}
    detr.controller.*, detr.mask_head.*  CondInst mask head
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn as nn

from .backbone import MaskedBackbone, build_input_proj, project_levels
from .heads import MLP, StillClassifier, VLAlign
from .mask_head import NUM_GEN_PARAMS, MaskHeadSmallConv, compute_locations, dynamic_mask_logits
from .position import image_sine_embedding
from .transformer import DeformableTransformer

CHECKPOINT_PREFIX = "model.segmentator.hipie."
IMAGE_SIZE = 1024
HIDDEN_DIM = 256
NUM_BG_QUERIES = 10
NUM_FG_QUERIES = 100
NUM_TOKENS = 8
LANG_DIM = 768
# strides 8/16/32/64 at 1024x1024
SPATIAL_SHAPES = ((128, 128), (64, 64), (32, 32), (16, 16))

_GAMMA_PATTERN = r"^detr\.detr\.transformer\.encoder\.vl_layers\.0\.b_attn\.gamma_[vl]$"

#: Checkpoint keys (prefix stripped) that are deliberately not loaded:
#:  - ``text_encoder.*``: HIPIE's BERT; SegLLM replaces ``forward_text`` with the (N, 8, 768) seg-head tokens.
#:  - ``criterion.*``: training loss state (``criterion._iter``).
#:  - ``detr.resizer.*``: FeatureResizer of DINO's dynamic label encoder, only used to build denoising queries
#:    in training.
#:  - ``detr.detr.transformer.resizer.*``: maps the pooled fused language to 256-d ``ref_feat``; with
#:    DECOUPLE_TGT + STILL_TGT_FOR_BOTH the decoder input is ``tgt + 0.0 * ref_feat`` == ``tgt`` exactly.
#:  - the fusion block's ``gamma_v``/``gamma_l`` (default, ``use_stored_gammas=False``): the released loader never
#:    loads them (transformers renames keys containing "gamma"), so the released model runs with their constructor
#:    value 1/6. ``HipieMaskDecoder(use_stored_gammas=True)`` loads them instead (see ``ignored_key_patterns``).
IGNORED_KEY_PATTERNS: tuple[str, ...] = (
    r"^text_encoder\.",
    r"^criterion\.",
    r"^detr\.resizer\.",
    r"^detr\.detr\.transformer\.resizer\.",
    _GAMMA_PATTERN,
)


def ignored_key_patterns(use_stored_gammas: bool = False) -> tuple[str, ...]:
    if use_stored_gammas:
        return tuple(p for p in IGNORED_KEY_PATTERNS if p != _GAMMA_PATTERN)
    return IGNORED_KEY_PATTERNS


def hipie_state_dict_from_checkpoint(state_dict: Mapping[str, torch.Tensor], use_stored_gammas: bool = False,
                                     prefix: str = CHECKPOINT_PREFIX) -> dict[str, torch.Tensor]:
    """Pick the HIPIE entries of a full SegLLM state dict, strip the prefix, drop the ignored keys."""
    pats = [re.compile(p) for p in ignored_key_patterns(use_stored_gammas)]
    out = {}
    for k, v in state_dict.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if any(p.search(k) for p in pats):
            continue
        out[k] = v
    return out


class _DeformableDETR(nn.Module):
    def __init__(self, use_stored_gammas: bool):
        super().__init__()
        self.backbone = nn.ModuleList([MaskedBackbone()])
        self.input_proj = build_input_proj(HIDDEN_DIM)
        self.transformer = DeformableTransformer(SPATIAL_SHAPES, HIDDEN_DIM, NUM_FG_QUERIES, NUM_BG_QUERIES,
                                                 use_stored_gammas=use_stored_gammas)
        num_dec = len(self.transformer.decoder.layers)
        # 0..5 decoder heads, 6 = encoder (two-stage) head; shared with the decoder (same objects).
        self.class_embed = nn.ModuleList([VLAlign(HIDDEN_DIM, LANG_DIM) for _ in range(num_dec)]
                                         + [StillClassifier(HIDDEN_DIM)])
        self.bbox_embed = nn.ModuleList([MLP(HIDDEN_DIM, HIDDEN_DIM, 4, 3) for _ in range(num_dec + 1)])
        self.iou_head = nn.ModuleList([nn.Linear(HIDDEN_DIM, 1) for _ in range(num_dec)])
        self.transformer.decoder.class_embed = self.class_embed
        self.transformer.decoder.bbox_embed = self.bbox_embed


class _DDETRSegm(nn.Module):
    def __init__(self, use_stored_gammas: bool):
        super().__init__()
        self.detr = _DeformableDETR(use_stored_gammas)
        self.controller = MLP(HIDDEN_DIM, HIDDEN_DIM, NUM_GEN_PARAMS, 3)
        self.mask_head = MaskHeadSmallConv(HIDDEN_DIM)


class HipieMaskDecoder(nn.Module):
    """HIPIE-R50 as SegLLM runs it: image (1,3,1024,1024) normalised + (N,8,768) conditioning -> raw outputs.

    Outputs follow the research code's ``coco_inference``: 110 queries = 10 background then 100 foreground.
    """

    def __init__(self, use_stored_gammas: bool = False):
        super().__init__()
        self.use_stored_gammas = use_stored_gammas
        self.ignored_key_patterns = ignored_key_patterns(use_stored_gammas)
        self.detr = _DDETRSegm(use_stored_gammas)
        self.spatial_shapes = [tuple(s) for s in SPATIAL_SHAPES]
        pos = torch.cat([image_sine_embedding(h, w).flatten(1).t() for h, w in SPATIAL_SHAPES], 0)  # S,256
        level_ids = torch.cat([torch.full((h * w,), i, dtype=torch.long) for i, (h, w) in enumerate(SPATIAL_SHAPES)])
        self.register_buffer("pos_embed", pos, persistent=False)
        self.register_buffer("level_ids", level_ids, persistent=False)
        h8, w8 = SPATIAL_SHAPES[0]
        self.register_buffer("mask_locations", compute_locations(h8, w8, IMAGE_SIZE // h8), persistent=False)

    # ------------------------------------------------------------------ image part
    def resnet_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """ResNet-50 res3/res4/res5 (B,512,128,128), (B,1024,64,64), (B,2048,32,32) — before input_proj."""
        return self.detr.detr.backbone[0](image)

    def backbone_features(self, image: torch.Tensor, return_resnet: bool = False):
        """image (B,3,1024,1024) normalised -> 4 projected levels (B,256,{128,64,32,16}^2).

        With ``return_resnet=True`` returns ``(levels, [res3, res4, res5])``.
        """
        if tuple(image.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"HIPIE expects a {IMAGE_SIZE}x{IMAGE_SIZE} padded image, got {tuple(image.shape)}")
        res = self.resnet_features(image)
        levels = project_levels(self.detr.detr.input_proj, res)
        return (levels, res) if return_resnet else levels

    # ------------------------------------------------------------------ text-dependent part
    def decode(self, features: list[torch.Tensor], conditioning: torch.Tensor) -> dict[str, torch.Tensor]:
        """features: ``backbone_features`` output (batch 1, or N); conditioning (N, 8, 768).

        Returns pred_logits (N,110,8), pred_boxes (N,110,4) cxcywh in [0,1], pred_boxious (N,110,1),
        pred_masks (N,110,256,256) logits.
        """
        detr = self.detr.detr
        lang = conditioning.to(torch.float32)
        n = lang.shape[0]
        src = torch.cat([f.flatten(2) for f in features], 2).transpose(1, 2)               # B,S,256
        pos = (self.pos_embed + detr.transformer.level_embed[self.level_ids]).unsqueeze(0)  # 1,S,256
        out = detr.transformer(src, pos, lang)
        hs = out["hs"]
        last = len(detr.transformer.decoder.layers) - 1
        pred_logits = detr.class_embed[last](hs, out["lang"])
        pred_boxes = out["boxes"]
        pred_ious = detr.iou_head[last](hs)

        memory = out["memory"]
        maps = []
        start = 0
        for h, w in self.spatial_shapes[:3]:
            maps.append(memory[:, start:start + h * w].transpose(1, 2).reshape(n, -1, h, w))
            start += h * w
        mask_feats = self.detr.mask_head(maps)
        params = self.detr.controller(hs)
        ref_px = out["ref_last_in"][..., :2] * float(IMAGE_SIZE)   # (w, h) scale, both 1024
        pred_masks = dynamic_mask_logits(mask_feats, ref_px, params, self.mask_locations, out_factor=2)
        return {"pred_logits": pred_logits, "pred_boxes": pred_boxes, "pred_boxious": pred_ious,
                "pred_masks": pred_masks}

    def forward(self, image: torch.Tensor, conditioning: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(self.backbone_features(image), conditioning)
