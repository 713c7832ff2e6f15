"""The KV cache reaches transformers' decoder under the name the installed forward declares.

transformers 5.0 and 5.17 take ``past_key_values``; 5.25 takes ``cache``. A name the forward does not declare
falls into its ``**kwargs`` and is dropped silently: the cache stays empty and from round 2 on every round sees
only its own tokens. These tests fail in that case (round 2 with the cache must equal a full recompute), and
run against whichever transformers is importable (set ``PYTHONPATH`` to an older one to check the pin's floor).
"""
from types import SimpleNamespace

import pytest
import torch
import transformers

from segllm_edge.errors import BackendError
from segllm_edge.export.graphs import LLMGraph
from segllm_edge.modeling.llm import LanguageModel, cache_kwarg, llama_config, run_decoder

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return LanguageModel(llama_config(CFG, attn_implementation="eager")).eval()


def _embeds(n, seed):
    return torch.randn(1, n, CFG["hidden_size"], generator=torch.Generator().manual_seed(seed))


def test_installed_decoder_declares_a_cache_argument(lm):
    name = cache_kwarg(lm.model)
    assert name in ("cache", "past_key_values"), (transformers.__version__, name)


@torch.no_grad()
def test_round_two_with_the_cache_equals_a_full_recompute(lm):
    e1, e2 = _embeds(5, 1), _embeds(4, 2)
    cache = lm.new_cache()
    lm(e1, cache)
    assert cache.get_seq_length() == 5, "round 1 left the cache empty: the cache argument was dropped"
    h2 = lm(e2, cache)
    assert cache.get_seq_length() == 9
    full = lm(torch.cat([e1, e2], dim=1), lm.new_cache())[:, 5:]
    torch.testing.assert_close(h2, full, rtol=1e-5, atol=1e-5)
    alone = lm(e2, lm.new_cache())
    assert (h2 - alone).abs().max() > 1e-3, "round 2 saw only its own tokens"


@torch.no_grad()
def test_export_graph_uses_the_past_it_is_given(lm):
    """``LLMGraph`` (the exported llm graph) with round 1's K/V as explicit past equals the full recompute."""
    e1, e2 = _embeds(5, 3), _embeds(4, 4)
    cache = lm.new_cache()
    lm(e1, cache)
    past = tuple((cache.layers[i].keys.clone(), cache.layers[i].values.clone())
                 for i in range(CFG["num_hidden_layers"]))
    h, *presents = LLMGraph(SimpleNamespace(llm=lm))(e2, past)
    full = lm(torch.cat([e1, e2], dim=1), lm.new_cache())[:, 5:]
    torch.testing.assert_close(h, full, rtol=1e-5, atol=1e-5)
    assert presents[0].shape[2] == 9


class _Recorder(torch.nn.Module):
    """Stand-in decoders whose forward declares one cache name (as 5.0/5.17 or 5.25 do) plus ``**kwargs``."""

    def __init__(self):
        super().__init__()
        self.seen = None


class _PastKeyValuesOnly(_Recorder):  # transformers 5.0 / 5.17
    def forward(self, inputs_embeds=None, position_ids=None, past_key_values=None, use_cache=None, **kwargs):
        self.seen = {"past_key_values": past_key_values, **kwargs}
        return SimpleNamespace(last_hidden_state=inputs_embeds)


class _CacheOnly(_Recorder):  # transformers 5.25+
    def forward(self, inputs_embeds=None, position_ids=None, cache=None, use_cache=None, **kwargs):
        self.seen = {"cache": cache, **kwargs}
        return SimpleNamespace(last_hidden_state=inputs_embeds)


class _NoCache(_Recorder):
    def forward(self, inputs_embeds=None, position_ids=None, use_cache=None, **kwargs):
        return SimpleNamespace(last_hidden_state=inputs_embeds)


@pytest.mark.parametrize("cls,name", [(_PastKeyValuesOnly, "past_key_values"), (_CacheOnly, "cache")])
def test_the_declared_name_is_chosen_not_the_kwargs_catch_all(cls, name):
    d, marker = cls(), object()
    run_decoder(d, torch.zeros(1, 1, 2), marker, torch.zeros(1, 1, dtype=torch.long))
    assert d.seen == {name: marker}


def test_a_decoder_without_a_cache_argument_is_refused():
    with pytest.raises(BackendError, match="KV-cache"):
        run_decoder(_NoCache(), torch.zeros(1, 1, 2), object(), torch.zeros(1, 1, dtype=torch.long))
