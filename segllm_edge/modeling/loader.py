"""Load a released SegLLM checkpoint folder into :class:`SegLLMModel`, strictly.

Every key of the checkpoint is either loaded into a module or deliberately ignored
(with the reason in :data:`IGNORED`); anything else is an error that lists the keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import checkpoint as ckpt
from .hipie import model as hipie_model
from .llm import llama_config
from ..contracts.model_info import ModelInfo
from .segllm import SegLLMModel
from ..pipeline.tokenizer import SegLLMTokenizer
from .vision import clip_config_from_weights
from .weight_source import WeightSource, read_tensor_infos

CLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
HIPIE_PREFIX = "model.segmentator.hipie."

# checkpoint prefix → module prefix (None: ignored). First match wins, so "model." comes last.
KEY_ROUTES: tuple[tuple[str, str | None], ...] = (
    (CLIP_PREFIX, "tower."),
    ("model.vision_tower.vision_tower.visual_projection.", None),
    ("model.mm_projector.", "projector."),
    ("model.mask_enc_head.", "box_encoder."),
    ("model.segmentator_predictor.", "seg_head.mlp."),
    (HIPIE_PREFIX, "hipie."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
)

IGNORED = {
    "model.vision_tower.vision_tower.visual_projection.*": "CLIP's contrastive projection; SegLLM uses layer -2 features",
    "model.segmentator.hipie.<IGNORED_KEY_PATTERNS>": "see segllm_edge.modeling.hipie.model.IGNORED_KEY_PATTERNS",
}


@dataclass
class LoadedCheckpoint:
    model: SegLLMModel
    tokenizer: SegLLMTokenizer
    info: ModelInfo
    config: dict
    ignored_keys: list[str]
    weights: WeightSource | None = None  # lazy=True: where the parameters left on the meta device are read from


def _hipie_ignored(key: str, use_stored_gammas: bool) -> bool:
    patterns = hipie_model.ignored_key_patterns(use_stored_gammas)
    return any(re.search(p, key) for p in patterns)


def route_keys(state: dict[str, torch.Tensor], use_stored_gammas: bool) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename checkpoint keys to module keys. Returns (renamed, ignored, unroutable)."""
    renamed: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unroutable: list[str] = []
    for key, value in state.items():
        for src, dst in KEY_ROUTES:
            if key.startswith(src):
                rest = key[len(src):]
                if dst is None or (src == HIPIE_PREFIX and _hipie_ignored(rest, use_stored_gammas)):
                    ignored.append(key)
                else:
                    renamed[dst + rest] = value
                break
        else:
            unroutable.append(key)
    return renamed, ignored, unroutable


def _fmt(keys: list[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, use_stored_gammas: bool = False,
                    attn_implementation: str = "sdpa", lazy: bool = False) -> LoadedCheckpoint:
    """``lazy``: read only the safetensors headers; every parameter except HIPIE's stays on the meta device (in
    ``dtype``, no memory) and ``LoadedCheckpoint.weights`` reads it on demand (the streaming exporter)."""
    folder = Path(path)
    cfg = ckpt.read_config(folder)
    ckpt.check_tokenizer_files(folder)
    files = ckpt.weight_files(folder)
    state = read_tensor_infos(files) if lazy else ckpt.read_state_dict(files)

    clip_cfg = clip_config_from_weights(state, CLIP_PREFIX)
    if cfg.get("mm_hidden_size") not in (None, clip_cfg.hidden_size):
        raise CheckpointError(f"config.json mm_hidden_size={cfg['mm_hidden_size']} but the CLIP weights are {clip_cfg.hidden_size} wide")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {cfg['mm_projector_type']!r} is not the released mlp2x_gelu")
    lcfg = llama_config(cfg, attn_implementation=attn_implementation)
    select_layer = int(cfg.get("mm_vision_select_layer", -2))
    with torch.device("meta"):  # no memory, no random init: the weights come from the checkpoint
        model = SegLLMModel(clip_cfg, lcfg, select_layer=select_layer, use_stored_gammas=use_stored_gammas)
    # HIPIE is fixed-size and precomputes constant buffers (positions, proposal grids): build it for real
    model.hipie = hipie_model.HipieMaskDecoder(use_stored_gammas=use_stored_gammas)

    renamed, ignored, unroutable = route_keys(state, use_stored_gammas)
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in renamed]
    unexpected = [k for k in renamed if k not in expected] + unroutable
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) (module names): {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_fmt(unexpected)}")
        raise CheckpointError(f"checkpoint {folder} does not match the SegLLM layout: " + "; ".join(parts))
    bad_shapes = [f"{k}: checkpoint {tuple(renamed[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if tuple(renamed[k].shape) != tuple(v.shape)]
    if bad_shapes:
        raise CheckpointError(f"checkpoint {folder} has {len(bad_shapes)} tensor(s) of the wrong shape: " + "; ".join(bad_shapes[:8]))

    weights = None
    if lazy:  # HIPIE (fixed size, ~0.2 GB) is read for real, everything else stays meta
        every = WeightSource(dict(renamed))
        weights = WeightSource({k: v for k, v in renamed.items() if not k.startswith("hipie.")})
        for k, v in renamed.items():
            renamed[k] = (every.get(k) if k.startswith("hipie.") else
                          torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype, device="meta"))
    for k, v in renamed.items():  # HIPIE stays float32 (the research code runs it in fp32)
        if v.is_floating_point():
            renamed[k] = v.to(torch.float32 if k.startswith("hipie.") else dtype)
    model.load_state_dict(renamed, strict=True, assign=True)
    model.tower.embeddings.register_buffer(  # non-persistent buffer, not in the checkpoint
        "position_ids", torch.arange(model.tower.embeddings.num_positions).expand((1, -1)), persistent=False)
    _materialise_buffers(model)
    model.eval().requires_grad_(False)

    tokenizer = SegLLMTokenizer.from_folder(folder)
    info = ModelInfo(
        hidden_size=lcfg.hidden_size,
        num_layers=lcfg.num_hidden_layers,
        num_kv_heads=lcfg.num_key_value_heads,
        head_dim=lcfg.head_dim,
        vocab_size=lcfg.vocab_size,
        clip_hidden=clip_cfg.hidden_size,
        clip_image_size=clip_cfg.image_size,
        image_tokens=(clip_cfg.image_size // clip_cfg.patch_size) ** 2,
        max_context=tokenizer.max_length,
        video_token_id=tokenizer.video_id,
        seg_token_id=tokenizer.seg_id,
        eos_token_id=tokenizer.eos_id,
        dtype=str(dtype).replace("torch.", ""),
    )
    if tokenizer.vocab_size > lcfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the LLM embeds only {lcfg.vocab_size}")
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, info=info, config=cfg, ignored_keys=sorted(ignored),
                            weights=weights)


def _materialise_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers created on the meta device (rotary inv_freq, …) are rebuilt on the CPU."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for mod in model.modules():
        if isinstance(mod, LlamaRotaryEmbedding):
            fresh = LlamaRotaryEmbedding(mod.config)
            mod.inv_freq = fresh.inv_freq
            mod.original_inv_freq = fresh.original_inv_freq
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise CheckpointError(f"internal: buffer {name} was not initialised")
