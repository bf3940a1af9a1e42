"""HF checkpoints in and out: transformers save_pretrained -> load_hf_model, save_hf_checkpoint -> transformers."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mytune.checkpoint.hf as hf_module
from mytune.checkpoint import load_hf_model, read_hf_config, save_hf_checkpoint
from mytune.errors import MytuneError
from mytune.models import ModelArgs, TransformerDecoder, llama_tiny
from tests.models.hf_reference import FAMILY_CONFIGS, SLIDING_CONFIGS, WINDOW, make_hf_model, random_tokens

TOLERANCE = 1e-5


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """Every family saved by transformers' own save_pretrained (safetensors)."""
    root = tmp_path_factory.mktemp("hf")
    models = {}
    for family in FAMILY_CONFIGS:
        model = make_hf_model(family)
        model.save_pretrained(root / family)
        models[family] = (model, root / family)
    return models


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_load_transformers_checkpoint_gives_same_logits(family, hf_checkpoints):
    hf, directory = hf_checkpoints[family]
    model = load_hf_model(directory).eval()
    tokens = random_tokens()
    diff = (logits(model, tokens) - logits(hf, tokens)).abs().max().item()
    print(f"{family}: max abs logit diff after load_hf_model {diff:.2e}")
    assert diff < TOLERANCE
    if model.args.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        with safe_open(directory / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()  # transformers drops the tied head; we rebuilt the tie


def test_load_builds_rope_tables_on_target_device_and_casts(hf_checkpoints):
    hf, directory = hf_checkpoints["llama3_gqa_scaled_rope"]
    model = load_hf_model(directory, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    rope = model.model.rotary_emb
    assert rope.inv_freq.dtype == torch.float32 and not rope.inv_freq.is_meta
    assert torch.equal(rope.inv_freq, hf.model.rotary_emb.inv_freq)  # llama3-scaled frequencies, recomputed


@pytest.mark.parametrize("family", ["llama3_gqa_scaled_rope", "qwen3_qk_norm_head_dim"])
def test_bf16_load_matches_transformers_bf16_load(family, hf_checkpoints):
    """Same checkpoint loaded in bf16 by both: the same operations in the same order give (near-)identical logits.
    (Measured bit-identical against transformers' sdpa path; a bf16 ulp at this scale is 0.016, eager differs by
    ~0.05, and rounding the RoPE frequencies to bf16 would cost ~0.05 too.)"""
    from transformers import AutoModelForCausalLM

    directory = hf_checkpoints[family][1]
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ours = load_hf_model(directory, dtype=torch.bfloat16).eval()
    tokens = random_tokens()
    expected, actual = logits(hf, tokens), logits(ours, tokens)
    assert actual.dtype == torch.bfloat16
    diff = (actual.float() - expected.float()).abs().max().item()
    print(f"{family}: bf16 max abs logit diff {diff:.3g} (logits up to {expected.float().abs().max():.2f})")
    assert diff < 0.016


@pytest.mark.parametrize("family", ["llama3_gqa_scaled_rope", "qwen2_bias_tied", "qwen3_qk_norm_head_dim"])
def test_saved_checkpoint_loads_in_transformers_identically(family, hf_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = load_hf_model(hf_checkpoints[family][1]).eval()
    out = save_hf_checkpoint(ours, tmp_path / "out", dtype=torch.float32)
    assert out == tmp_path / "out"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    hf_state = reloaded.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(hf_state[key], value), key
    tokens = random_tokens()
    assert torch.equal(logits(reloaded, tokens), logits(hf_checkpoints[family][0], tokens))  # same weights, same code
    assert (logits(reloaded, tokens) - logits(ours, tokens)).abs().max() < TOLERANCE
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["model_type"] == ours.args.model_type
    saved_keys = set(load_file(out / "model.safetensors"))
    assert ("lm_head.weight" in saved_keys) == (not ours.args.tie_word_embeddings)


@pytest.mark.parametrize("family", SLIDING_CONFIGS)
def test_sliding_window_survives_load_and_save(family, tmp_path):
    """transformers checkpoint -> ours -> saved -> transformers: the window (shorter than the tokens) is kept."""
    from transformers import AutoModelForCausalLM

    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf").eval()
    tokens = random_tokens()
    assert (logits(ours, tokens) - logits(hf, tokens)).abs().max() < TOLERANCE
    out = save_hf_checkpoint(ours, tmp_path / "out", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == WINDOW
    if ours.args.model_type != "mistral":
        assert config["use_sliding_window"] is True and config["max_window_layers"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert reloaded.config.sliding_window == WINDOW
    assert torch.equal(logits(reloaded, tokens), logits(hf, tokens))


def test_bf16_save_writes_bf16_and_generation_config(tmp_path):
    torch.manual_seed(0)
    model = llama_tiny(vocab_size=128)
    out = save_hf_checkpoint(model, tmp_path / "ckpt")  # default dtype: bfloat16
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert torch.equal(tensors["model.norm.weight"], model.model.norm.weight.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    reloaded = load_hf_model(out, dtype=torch.bfloat16)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, tensors[key]), key


def test_sharded_round_trip_is_bit_identical(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = llama_tiny(vocab_size=256).eval()
    out = save_hf_checkpoint(model, tmp_path / "sharded", dtype=torch.float32, max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    for shard in shards:  # no shard exceeds the limit unless it holds a single larger tensor
        tensors = load_file(out / shard)
        assert sum(t.numel() * 4 for t in tensors.values()) <= 300_000 or len(tensors) == 1

    reloaded = load_hf_model(out)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = random_tokens(vocab_size=256)
    assert (logits(hf, tokens) - logits(model, tokens)).abs().max() < TOLERANCE


def test_overwrite_replaces_the_directory(tmp_path):
    model = llama_tiny(vocab_size=64)
    save_hf_checkpoint(model, tmp_path / "out", max_shard_bytes=100_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    save_hf_checkpoint(model, tmp_path / "out")  # now a single file: no stale shards may remain
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_mid_write_leaves_no_partial_directory(tmp_path, monkeypatch):
    model = llama_tiny(vocab_size=64)
    calls = []

    def failing_save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the first shard is on disk, the second one fails
            raise OSError("disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_module, "save_file", failing_save_file)
    with pytest.raises(MytuneError, match="disk full"):  # one line for the user, not a traceback
        save_hf_checkpoint(model, tmp_path / "new", max_shard_bytes=100_000)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory

    monkeypatch.setattr(hf_module, "save_file", save_file)
    save_hf_checkpoint(model, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    calls.clear()
    monkeypatch.setattr(hf_module, "save_file", failing_save_file)
    with pytest.raises(MytuneError, match="previous one is kept"):
        save_hf_checkpoint(llama_tiny(vocab_size=64), tmp_path / "old", max_shard_bytes=100_000)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before  # old checkpoint intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_temp_dir_is_next_to_target_and_named_by_pid(tmp_path, monkeypatch):
    seen = []
    real = hf_module._write_safetensors

    def spy(tensors, directory, dtype, max_shard_bytes):
        seen.append(directory)
        real(tensors, directory, dtype, max_shard_bytes)

    monkeypatch.setattr(hf_module, "_write_safetensors", spy)
    save_hf_checkpoint(llama_tiny(vocab_size=64), tmp_path / "step_3")
    assert seen == [tmp_path / f".tmp-step_3-{os.getpid()}"]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_hf_checkpoint(llama_tiny(vocab_size=64), tmp_path / "ckpt", dtype=torch.float32)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_key_names_the_key_and_shape(tiny_checkpoint):
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, tiny_checkpoint / "model.safetensors")
    with pytest.raises(MytuneError) as err:
        load_hf_model(tiny_checkpoint)
    assert "missing key 'model.layers.2.mlp.up_proj.weight' of shape (384, 128)" in one_line(err)


def test_wrong_shape_names_the_key_and_both_shapes(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["intermediate_size"] = 256
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(MytuneError) as err:
        load_hf_model(tiny_checkpoint)
    message = one_line(err)
    assert "model.safetensors: 'model.layers.0.mlp.down_proj.weight' has shape (128, 384)" in message
    assert "config.json implies (128, 256)" in message


def test_unexpected_key_is_reported(tiny_checkpoint):
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(tensors, tiny_checkpoint / "model.safetensors")
    with pytest.raises(MytuneError, match="unexpected key 'model.layers.9.mlp.up_proj.weight'") as err:
        load_hf_model(tiny_checkpoint)
    one_line(err)


def test_missing_files_are_user_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(MytuneError, match="does not exist"):
        read_hf_config(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MytuneError, match="config.json not found"):
        load_hf_model(tmp_path / "empty")
    (tiny_checkpoint / "model.safetensors").unlink()
    with pytest.raises(MytuneError, match="has no model.safetensors or model.safetensors.index.json"):
        load_hf_model(tiny_checkpoint)


def test_index_naming_a_missing_shard_is_reported(tmp_path):
    out = save_hf_checkpoint(llama_tiny(vocab_size=64), tmp_path / "s", max_shard_bytes=100_000)
    (out / "model-00002-of-{:05d}.safetensors".format(len(list(out.glob("model-*"))))).unlink()
    with pytest.raises(MytuneError, match="names model-00002-of-.*which does not exist"):
        load_hf_model(out)


def test_tied_checkpoint_that_still_stores_the_head_loads(tmp_path):
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                     tie_word_embeddings=True)
    model = TransformerDecoder(args)
    out = save_hf_checkpoint(model, tmp_path / "t", dtype=torch.float32)
    tensors = load_file(out / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    loaded = load_hf_model(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_saved_rotary_buffers_of_old_checkpoints_are_ignored(tiny_checkpoint):
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(16)
    save_file(tensors, tiny_checkpoint / "model.safetensors", metadata={"format": "pt"})
    model = load_hf_model(tiny_checkpoint)
    assert model.model.rotary_emb.inv_freq.abs().min() > 0


def test_legacy_pytorch_bin_is_read_with_weights_only(tiny_checkpoint, monkeypatch):
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    (tiny_checkpoint / "model.safetensors").unlink()
    torch.save(tensors, tiny_checkpoint / "pytorch_model.bin")
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = load_hf_model(tiny_checkpoint)
    assert seen == [True]
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])


def test_missing_tokenizer_file_fails_before_writing(tmp_path):
    with pytest.raises(MytuneError, match="tokenizer file .*nope.model does not exist"):
        save_hf_checkpoint(llama_tiny(vocab_size=64), tmp_path / "x", tokenizer_files=[tmp_path / "nope.model"])
    assert list(tmp_path.iterdir()) == []
