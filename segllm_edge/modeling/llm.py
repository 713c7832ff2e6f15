"""The LLM: transformers' Llama taking ``inputs_embeds``, returning final-norm hidden states and its KV cache."""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel

from ..errors import BackendError

# What the decoder's forward calls its KV-cache argument, newest name first: transformers renames
# ``past_key_values`` to ``cache`` (5.25 has ``cache``; 5.0 and 5.17 only ``past_key_values``). A name the
# installed forward does not declare would land in its ``**kwargs`` and be dropped without a word, so the
# name is read off the signature, never guessed.
CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(decoder: nn.Module | type) -> str:
    """The name under which ``decoder``'s forward (an instance or its class) takes the KV cache;
    :class:`BackendError` if it takes none."""
    cls = decoder if isinstance(decoder, type) else type(decoder)
    params = inspect.signature(cls.forward).parameters
    for name in CACHE_KWARGS:
        p = params.get(name)
        if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            return name
    import transformers

    raise BackendError(
        f"{cls.__name__}.forward of transformers {transformers.__version__} takes no KV-cache argument "
        f"(none of {', '.join(CACHE_KWARGS)}); the installed transformers is not one this package supports")


def run_decoder(decoder: nn.Module, inputs_embeds: torch.Tensor, cache, position_ids: torch.Tensor,
                use_cache: bool = True):
    """Call transformers' decoder (``LlamaModel``) with ``cache`` passed under the name its forward declares."""
    return decoder(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=use_cache,
                   **{cache_kwarg(decoder): cache})


def llama_config(cfg: dict, attn_implementation: str = "sdpa") -> LlamaConfig:
    """LlamaConfig from a LLaVA-Llama ``config.json`` (the ``mm_*`` fields are read elsewhere)."""
    heads = cfg["num_attention_heads"]
    return LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim", cfg["hidden_size"] // heads),
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=cfg.get("rope_theta", 10000.0),
        attention_bias=cfg.get("attention_bias", False),
        mlp_bias=cfg.get("mlp_bias", False),
        pad_token_id=cfg.get("pad_token_id", 0),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )


class LanguageModel(nn.Module):
    """Llama decoder with the checkpoint's layout: ``model.*`` → :attr:`model`, ``lm_head`` separate."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # free-text generation only

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(self, inputs_embeds: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """Prefill ``inputs_embeds`` (B, T, H) after what ``cache`` holds; the cache grows in place.

        Returns the final-norm hidden states (B, T, H).
        """
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        return run_decoder(self.model, inputs_embeds, cache, positions, use_cache=cache is not None).last_hidden_state
