"""Reading a released SegLLM checkpoint folder: config.json, (sharded) safetensors, tokenizer.

Only reading and validating files lives here; which key goes to which module is
decided in :mod:`segllm_edge.modeling.loader`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer_config.json",)  # plus tokenizer.json or tokenizer.model


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what} is missing: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} is not valid JSON: {path} ({exc})") from None


def read_config(folder: Path) -> dict:
    cfg = read_json(folder / "config.json", "config.json")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise CheckpointError(f"config.json in {folder} lacks {', '.join(missing)}: is this a SegLLM (LLaVA-Llama) checkpoint?")
    ints = required + ("num_key_value_heads", "max_position_embeddings", "mm_hidden_size")
    bad = [f"{k}={cfg[k]!r}" for k in ints if k in cfg and cfg[k] is not None
           and (isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] <= 0)]
    if bad:
        raise CheckpointError(f"config.json in {folder} has {', '.join(bad)}: these must be positive integers")
    seg = cfg.get("segmentator", "hipie")
    if seg not in ("hipie", "hipie0"):
        raise CheckpointError(f"config.json names segmentator {seg!r}; only the released HIPIE decoder is supported")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked against the index when there is one."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    index = folder / INDEX_NAME
    if index.exists():
        meta = read_json(index, INDEX_NAME)
        names = sorted(set(meta.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{index} has an empty weight_map")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {folder} is incomplete: {INDEX_NAME} lists missing file(s) {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: convert PyTorch .bin weights to safetensors first)" if bins else ""
        raise CheckpointError(f"no *.safetensors weights in {folder}{hint}")
    return files


def read_state_dict(files: Iterable[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read all tensors; floating tensors are cast to ``dtype`` when given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read weights file {f}: {exc} (corrupt or truncated?)") from None
        dup = set(part).intersection(state)
        if dup:
            raise CheckpointError(f"{f} repeats keys already read from another shard: {sorted(dup)[:5]}")
        if dtype is not None:
            part = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in part.items()}
        state.update(part)
    return state


def check_tokenizer_files(folder: Path) -> None:
    has_model = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    if not has_model:
        raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model next to config.json")
