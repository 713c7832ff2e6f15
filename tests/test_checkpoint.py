"""Loading checkpoints: strict keys, sharding, clear errors for bad folders."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import segllm_edge
from segllm_edge import CheckpointError
from segllm_edge.tiny import TinySizes, hipie_entries, init_rule, make_tiny_checkpoint, _llm_clip_entries


def test_factory_reproduces_the_golden_layout_and_init_rules(golden_dir):
    golden = {e["key"]: e for e in json.loads((golden_dir / "state_dict_keys.json").read_text())["keys"]}
    mine = {e["key"]: e for e in _llm_clip_entries(TinySizes(), 1011) + hipie_entries()}
    assert set(golden) == set(mine)
    for k, e in golden.items():
        assert list(e["shape"]) == list(mine[k]["shape"]), k
        assert (e.get("tied_to") or None) == (mine[k].get("tied_to") or None), k
        if not e.get("tied_to"):
            assert init_rule(k, e["shape"]) == e["init"], k


def test_golden_model_loads_strictly(golden_model):
    info = golden_model.info
    assert (info.hidden_size, info.num_layers, info.clip_hidden, info.image_tokens) == (128, 2, 128, 256)
    assert (info.video_token_id, info.seg_token_id, info.max_context) == (1006, 1009, 2048)
    ignored = golden_model.backend.loaded.ignored_keys
    assert any(k.endswith("visual_projection.weight") for k in ignored)
    assert any(".text_encoder." in k for k in ignored)
    assert any(k.endswith("gamma_v") for k in ignored)


def test_stored_gammas_option(golden_ckpt, golden_state_dict):
    m = segllm_edge.load(golden_ckpt, use_stored_gammas=True)
    key = "model.segmentator.hipie.detr.detr.transformer.encoder.vl_layers.0.b_attn.gamma_v"
    name = key[len("model.segmentator.hipie."):]
    got = dict(m.backend.model.hipie.state_dict(keep_vars=True))[name]
    assert torch.equal(got, golden_state_dict[key])
    hipie = segllm_edge.load(golden_ckpt).backend.model.hipie
    default = {**dict(hipie.named_parameters()), **dict(hipie.named_buffers())}[name]
    assert torch.allclose(default, torch.full_like(default, 1 / 6))


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("small"), TinySizes(hidden=64, layers=1, heads=2, intermediate=96,
                                                                            clip_hidden=64, clip_layers=2, clip_intermediate=128),
                                shards=3)


def test_sharded_checkpoint_with_index_loads(small_ckpt):
    assert (small_ckpt / "model.safetensors.index.json").exists()
    m = segllm_edge.load(small_ckpt)
    assert m.info.hidden_size == 64 and m.info.clip_hidden == 64


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(small_ckpt, tmp_path):
    d = _copy(small_ckpt, tmp_path / "c")
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        segllm_edge.load(d)


def test_corrupt_shard_is_named(small_ckpt, tmp_path):
    d = _copy(small_ckpt, tmp_path / "c")
    p = d / "model-00001-of-00003.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model-00001-of-00003.safetensors"):
        segllm_edge.load(d)


def test_missing_and_unexpected_keys_are_listed(small_ckpt, tmp_path):
    d = _copy(small_ckpt, tmp_path / "c")
    p = d / "model-00003-of-00003.safetensors"
    sd = load_file(str(p))
    dropped = sorted(sd)[0]
    sd.pop(dropped)
    sd["model.some_new_head.weight"] = torch.zeros(2)
    save_file(sd, str(p))
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"].pop(dropped)
    idx["weight_map"]["model.some_new_head.weight"] = p.name
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e:
        segllm_edge.load(d)
    assert "missing 1 key" in str(e.value) and "unexpected" in str(e.value)


def test_shape_mismatch_is_named(small_ckpt, tmp_path):
    d = _copy(small_ckpt, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong shape.*mlp"):
        segllm_edge.load(d)


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer.model")], "no tokenizer"),
    (lambda d: [p.unlink() for p in d.glob("*.safetensors*")], "no \\*.safetensors"),
])
def test_broken_folders(small_ckpt, tmp_path, damage, match):
    d = _copy(small_ckpt, tmp_path / "c")
    damage(d)
    with pytest.raises(CheckpointError, match=match):
        segllm_edge.load(d)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        segllm_edge.load(tmp_path / "nope")


def test_factory_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        make_tiny_checkpoint(tmp_path)
