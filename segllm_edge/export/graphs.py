"""The exportable modules, one per manifest graph, wrapping the reference model's parts (no re-implementation)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from ..modeling.llm import run_decoder
from ..modeling.segllm import SegLLMModel


class VisionEncoderGraph(nn.Module):
    def __init__(self, m: SegLLMModel):
        super().__init__()
        self.enc = m.vision_encoder

    def forward(self, pixel_values):
        return self.enc(pixel_values)


class MaskEncoderGraph(nn.Module):
    def __init__(self, m: SegLLMModel):
        super().__init__()
        self.enc = m.mask_encoder

    def forward(self, crops, boxes):
        return self.enc(crops, boxes)


class LLMGraph(nn.Module):
    """transformers' Llama with the KV cache as explicit tensors (optimum's naming)."""

    def __init__(self, m: SegLLMModel):
        super().__init__()
        self.llm = m.llm

    def forward(self, inputs_embeds, past):
        cache = DynamicCache(config=self.llm.config)
        for i, (k, v) in enumerate(past):
            cache.update(k, v, i)
        past_len = past[0][0].shape[2]
        positions = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_len).unsqueeze(0)
        h = run_decoder(self.llm.model, inputs_embeds, cache, positions).last_hidden_state
        presents = []
        for i in range(len(past)):
            presents += [cache.layers[i].keys, cache.layers[i].values]
        return (h, *presents)


class SegHeadGraph(nn.Module):
    def __init__(self, m: SegLLMModel):
        super().__init__()
        self.head = m.seg_head

    def forward(self, hidden):
        return self.head(hidden)


class MaskBackboneGraph(nn.Module):
    def __init__(self, m: SegLLMModel):
        super().__init__()
        self.hipie = m.hipie

    def forward(self, image):
        return tuple(self.hipie.backbone_features(image))


class MaskDecoderGraph(nn.Module):
    def __init__(self, m: SegLLMModel):
        super().__init__()
        self.hipie = m.hipie

    def forward(self, f0, f1, f2, f3, conditioning):
        o = self.hipie.decode([f0, f1, f2, f3], conditioning)
        return o["pred_logits"], o["pred_boxes"], o["pred_boxious"], o["pred_masks"]


GRAPH_MODULES = {
    "vision_encoder": VisionEncoderGraph,
    "mask_encoder": MaskEncoderGraph,
    "llm": LLMGraph,
    "seg_head": SegHeadGraph,
    "mask_backbone": MaskBackboneGraph,
    "mask_decoder": MaskDecoderGraph,
}


def example_inputs(name: str, info, generator: torch.Generator | None = None):
    """Example arguments for exporting (and parity-testing) a graph; dynamic axes get non-trivial sizes."""
    g = generator or torch.Generator().manual_seed(0)
    H, S = info.hidden_size, info.clip_image_size

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if name == "vision_encoder":
        return (r(2, 3, S, S),)
    if name == "mask_encoder":
        return (r(3, 3, S, S), torch.rand(3, 4, generator=g))
    if name == "llm":
        past = tuple((r(1, info.num_kv_heads, 7, info.head_dim), r(1, info.num_kv_heads, 7, info.head_dim))
                     for _ in range(info.num_layers))
        return (r(1, 5, H), past)
    if name == "seg_head":
        return (r(3, H),)
    if name == "mask_backbone":
        return (r(1, 3, 1024, 1024),)
    if name == "mask_decoder":
        from ..contracts.manifest import HIPIE_LEVELS

        return (*[r(1, 256, h, w) for h, w in HIPIE_LEVELS], r(2, 8, 768))
    raise KeyError(name)


def flatten_inputs(name: str, args) -> list[torch.Tensor]:
    """Example arguments in the graph's flat input order (the manifest's order)."""
    if name == "llm":
        emb, past = args
        return [emb] + [t for kv in past for t in kv]
    return list(args)


def dynamic_shapes(name: str, spec, args):
    """torch.export dynamic shapes from the manifest's named axes."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(axis: str):
        if axis not in dims:
            dims[axis] = torch.export.Dim(axis.replace(".", "_"), min=0 if axis == "past" else 1, max=4096)
        return dims[axis]

    def for_tensor(t):
        return {i: dim(a) for i, a in t.dynamic_axes.items()} or None

    ins = [for_tensor(t) for t in spec.inputs]
    if name == "llm":
        kv = ins[1:]
        return (ins[0], tuple((kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)))
    return tuple(ins)
