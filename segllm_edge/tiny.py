"""Tiny SegLLM checkpoints in the released layout, for tests, demos and benchmarks.

Weights are a pure function of each key's name and shape: every tensor is drawn from a
generator seeded with the CRC32 of its key, with an init rule chosen by the key's kind
(the same rules as the reference-run fixture, so the fixture's checkpoint is rebuilt
bit-exactly from its key list). The LLM and CLIP sizes are configurable; the HIPIE-R50
decoder is the full released architecture (its layout ships in ``assets/hipie_layout.json``).
The tokenizer is a real Llama tokenizer (1000 base tokens + SegLLM's 11 added tokens)
shipped with the package, so nothing is downloaded.
"""
from __future__ import annotations

import json
import math
import shutil
import zlib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import CheckpointError

#: ``make-tiny-checkpoint --dtype`` → the dtype of the floating tensors written (None: fp32 as drawn)
CHECKPOINT_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
INIT_RULES = ("randn_over_sqrt_fanin", "one_plus_0.1randn", "one_plus_0.1rand", "0.1randn", "0.02randn")


def init_rule(key: str, shape) -> str:
    """The init rule of a tensor from its key and shape."""
    if len(shape) >= 2:
        return "randn_over_sqrt_fanin"
    if key.endswith("running_mean"):
        return "0.1randn"
    if key.endswith("running_var"):
        return "one_plus_0.1rand"
    if key.endswith(".weight"):
        return "one_plus_0.1randn"  # norm scales (LayerNorm, RMSNorm, GroupNorm, FrozenBN)
    return "0.02randn"


def make_tensor(key: str, shape, rule: str | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    shape = list(shape)
    rule = rule or init_rule(key, shape)
    if rule == "randn_over_sqrt_fanin":
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    if rule == "one_plus_0.1randn":
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if rule == "one_plus_0.1rand":
        return 1 + 0.1 * torch.rand(shape, generator=g)
    if rule == "0.1randn":
        return 0.1 * torch.randn(shape, generator=g)
    if rule == "0.02randn":
        return 0.02 * torch.randn(shape, generator=g)
    raise ValueError(f"unknown init rule {rule!r} for {key}")


def tensors_from_entries(entries: list[dict], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``[{key, shape, init?, tied_to?}]`` → tensors (tied keys are copies of their source), cast to ``dtype``
    one by one when given (fp32 draws, so a bf16 checkpoint holds the fp32 one's values rounded)."""
    out: dict[str, torch.Tensor] = {}
    for e in sorted(entries, key=lambda e: e["key"]):
        if not e.get("tied_to"):
            t = make_tensor(e["key"], e["shape"], e.get("init"))
            out[e["key"]] = t.to(dtype) if dtype is not None else t
    for e in entries:
        if e.get("tied_to"):
            out[e["key"]] = out[e["tied_to"]].clone()
    return out


@dataclass
class TinySizes:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    clip_hidden: int = 128
    clip_layers: int = 3
    clip_patch: int = 14
    clip_image: int = 224
    clip_intermediate: int = 512
    clip_proj: int = 64


def _asset(*parts: str) -> Path:
    return Path(str(resources.files("segllm_edge").joinpath("assets", *parts)))


def _llm_clip_entries(s: TinySizes, vocab: int) -> list[dict]:
    h, c = s.hidden, s.clip_hidden
    e: list[tuple[str, list[int]]] = [("lm_head.weight", [vocab, h]), ("model.embed_tokens.weight", [vocab, h]),
                                      ("model.norm.weight", [h])]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        e += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
              (p + "mlp.gate_proj.weight", [s.intermediate, h]), (p + "mlp.up_proj.weight", [s.intermediate, h]),
              (p + "mlp.down_proj.weight", [h, s.intermediate])]
        e += [(p + f"self_attn.{n}_proj.weight", [h, h]) for n in "qkvo"]
    e += [("model.mm_projector.0.weight", [h, c]), ("model.mm_projector.0.bias", [h]),
          ("model.mm_projector.2.weight", [h, h]), ("model.mm_projector.2.bias", [h]),
          ("model.mask_enc_head.weight", [h, 4]), ("model.mask_enc_head.bias", [h]),
          ("model.segmentator_predictor.0.weight", [h, h]), ("model.segmentator_predictor.0.bias", [h]),
          ("model.segmentator_predictor.2.weight", [8 * 768, h]), ("model.segmentator_predictor.2.bias", [8 * 768])]
    v = "model.vision_tower.vision_tower."
    n_pos = (s.clip_image // s.clip_patch) ** 2 + 1
    e += [(v + "visual_projection.weight", [s.clip_proj, c]),
          (v + "vision_model.embeddings.class_embedding", [c]),
          (v + "vision_model.embeddings.patch_embedding.weight", [c, 3, s.clip_patch, s.clip_patch]),
          (v + "vision_model.embeddings.position_embedding.weight", [n_pos, c])]
    for n in ("pre_layrnorm", "post_layernorm"):
        e += [(v + f"vision_model.{n}.weight", [c]), (v + f"vision_model.{n}.bias", [c])]
    for i in range(s.clip_layers):
        p = v + f"vision_model.encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            e += [(p + f"{n}.weight", [c]), (p + f"{n}.bias", [c])]
        e += [(p + "mlp.fc1.weight", [s.clip_intermediate, c]), (p + "mlp.fc1.bias", [s.clip_intermediate]),
              (p + "mlp.fc2.weight", [c, s.clip_intermediate]), (p + "mlp.fc2.bias", [c])]
        for n in ("q", "k", "v", "out"):
            e += [(p + f"self_attn.{n}_proj.weight", [c, c]), (p + f"self_attn.{n}_proj.bias", [c])]
    return [{"key": k, "shape": sh} for k, sh in e]


def hipie_entries() -> list[dict]:
    layout = json.loads(_asset("hipie_layout.json").read_text())
    p = layout["prefix"]
    return [{"key": p + e["key"], "shape": e["shape"], **({"tied_to": p + e["tied_to"]} if e.get("tied_to") else {})}
            for e in layout["keys"]]


def write_weights(tensors: dict[str, torch.Tensor], out: Path, shards: int = 1) -> None:
    from safetensors.torch import save_file

    keys = sorted(tensors)
    if shards <= 1:
        save_file({k: tensors[k].contiguous() for k in keys}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _config(s: TinySizes, vocab: int) -> dict:
    cfg = json.loads(_asset("tiny_config.json").read_text())
    cfg.update(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
               num_key_value_heads=s.heads, head_dim=s.hidden // s.heads, intermediate_size=s.intermediate,
               mm_hidden_size=s.clip_hidden, vocab_size=vocab)
    cfg["segllm_edge_tiny_sizes"] = asdict(s)
    return cfg


def make_tiny_checkpoint(out: str | Path, sizes: TinySizes | None = None, shards: int = 1, force: bool = False,
                         entries: list[dict] | None = None, dtype: str = "fp32") -> Path:
    """Write a tiny SegLLM checkpoint folder. ``entries`` (a key list with init rules) overrides the sizes,
    e.g. to rebuild the reference-run fixture's weights exactly. ``dtype``: ``"fp32"``, or ``"bf16"`` /
    ``"fp16"`` (safetensors in that dtype, as the released checkpoints are bf16)."""
    if dtype not in CHECKPOINT_DTYPES:
        raise CheckpointError(f"unknown checkpoint dtype {dtype!r}; choose one of {', '.join(CHECKPOINT_DTYPES)}")
    s = sizes or TinySizes()
    if s.hidden % s.heads:
        raise CheckpointError(f"hidden size {s.hidden} is not divisible by {s.heads} heads")
    if s.clip_hidden % 64:
        raise CheckpointError(f"CLIP hidden size {s.clip_hidden} must be a multiple of 64 (CLIP head dim)")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} is not empty; pass force=True (--force) to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.safetensors*"):
        f.unlink()
    tok_dir = _asset("tiny_tokenizer")
    for f in tok_dir.iterdir():
        shutil.copyfile(f, out / f.name)
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]) + \
        len(json.loads((tok_dir / "added_tokens.json").read_text()))
    if entries is None:
        entries = _llm_clip_entries(s, vocab) + hipie_entries()
    (out / "config.json").write_text(json.dumps(_config(s, vocab), indent=2))
    write_weights(tensors_from_entries(entries, CHECKPOINT_DTYPES[dtype]), out, shards=shards)
    return out
