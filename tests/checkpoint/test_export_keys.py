"""A fine-tuned checkpoint keeps every key of its input's config.json and generation_config.json.

The inputs are tiny checkpoints that transformers itself writes (its config classes for each family, plus keys
mytune does not model: pad/unk ids, a custom key, sampling defaults). They go through each way mytune saves: a plain
load -> save, a LoRA merge -> save, and FSDP's `gather_full_model` (the distributed recipes' save path).
"""

import json

import pytest
import torch

from mytune.checkpoint.hf import load_hf_model, read_hf_config, read_hf_model_args, save_hf_checkpoint
from mytune.models import TransformerDecoder
from mytune.models.builders import model_args
from mytune.models.transformer import ModelArgs
from mytune.modules.lora import apply_lora, merge_lora

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
DTYPE_KEYS = {"torch_dtype", "dtype"}  # the one thing a save in another dtype must change
EXTRA_CONFIG = {"pad_token_id": 3, "unk_token_id": 0, "my_custom_key": {"nested": [1, 2]}}
EXTRA_GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "pad_token_id": 3,
                    "repetition_penalty": 1.05, "my_generation_key": "kept"}


def _hf_config(family: str):
    from transformers import AutoConfig

    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 bos_token_id=1, eos_token_id=2, **EXTRA_CONFIG)
    if family == "qwen3":
        sizes["head_dim"] = 16
    if family in ("qwen2", "qwen3"):
        sizes.update(use_sliding_window=False, sliding_window=4096, max_window_layers=2)  # Qwen's shipped values
    return AutoConfig.for_model(family, **sizes)


@pytest.fixture(scope="module", params=FAMILIES)
def source(request, tmp_path_factory):
    """A tiny checkpoint saved by transformers, with a generation_config.json that has sampling defaults."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(f"src_{request.param}")
    model = AutoModelForCausalLM.from_config(_hf_config(request.param))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, **EXTRA_GENERATION)
    model.save_pretrained(directory)
    return directory


def _read(directory, name):
    return json.loads((directory / name).read_text())


def assert_keys_kept(source_dir, out_dir, dtype_name):
    """Every key of the input's config.json and generation_config.json is in the output with the same value, except
    the dtype, which is the saved one."""
    for name in ("config.json", "generation_config.json"):
        before, after = _read(source_dir, name), _read(out_dir, name)
        assert before, name
        for key, value in before.items():
            assert key in after, f"{name}: {key} dropped"
            expected = dtype_name if key in DTYPE_KEYS else value
            assert after[key] == expected, f"{name}: {key} was {value!r}, saved {after[key]!r}"
    assert _read(out_dir, "config.json")["torch_dtype"] == dtype_name


def test_the_source_has_the_keys_under_test(source):
    config, generation = _read(source, "config.json"), _read(source, "generation_config.json")
    assert EXTRA_CONFIG.items() <= config.items()
    assert EXTRA_GENERATION.items() <= generation.items()


def test_load_then_save_keeps_every_key(source, tmp_path):
    model = load_hf_model(source)
    out = save_hf_checkpoint(model, tmp_path / "out", dtype=torch.bfloat16)
    assert_keys_kept(source, out, "bfloat16")
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(out)
    assert (config.pad_token_id, config.unk_token_id, config.my_custom_key) == (3, 0, {"nested": [1, 2]})
    assert GenerationConfig.from_pretrained(out).top_k == 20
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        ours = load_hf_model(out)(tokens)
        theirs = reloaded(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # the same bf16 weights, the same model


def test_lora_merge_then_save_keeps_every_key(source, tmp_path):
    model = load_hf_model(source)
    torch.manual_seed(0)
    apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4.0)
    out = save_hf_checkpoint(merge_lora(model), tmp_path / "merged", dtype=torch.float32)
    assert_keys_kept(source, out, "float32")


def test_a_resave_keeps_every_key_again(source, tmp_path):
    """A resumed run reads its own step_<N>: the keys survive a second round."""
    first = save_hf_checkpoint(load_hf_model(source), tmp_path / "first", dtype=torch.float32)
    second = save_hf_checkpoint(load_hf_model(first), tmp_path / "second", dtype=torch.bfloat16)
    assert_keys_kept(source, second, "bfloat16")


def test_a_changed_field_is_rewritten_and_the_rest_kept(source, tmp_path):
    model = load_hf_model(source)
    model.args.eos_token_id = [2, 4]
    out = save_hf_checkpoint(model, tmp_path / "out", dtype=torch.float32)
    config, generation = _read(out, "config.json"), _read(out, "generation_config.json")
    assert config["eos_token_id"] == generation["eos_token_id"] == [2, 4]
    before = _read(source, "config.json")
    assert {k: v for k, v in config.items() if k not in DTYPE_KEYS | {"eos_token_id"}} == \
        {k: v for k, v in before.items() if k not in DTYPE_KEYS | {"eos_token_id"}}
    assert EXTRA_GENERATION.items() <= generation.items()


def test_random_start_writes_what_model_args_give(tmp_path):
    args = model_args("qwen3_0_6b_tiny")
    out = save_hf_checkpoint(TransformerDecoder(args), tmp_path / "out", dtype=torch.float32)
    assert _read(out, "config.json") == args.to_hf_config(torch_dtype="float32")
    assert _read(out, "generation_config.json") == {"bos_token_id": args.bos_token_id,
                                                    "eos_token_id": args.eos_token_id}


def test_source_configs_stay_out_of_equality_and_the_state_dict(source):
    args = read_hf_model_args(source)
    assert args.hf_config == _read(source, "config.json")
    assert args.hf_generation_config == _read(source, "generation_config.json")
    assert args == ModelArgs.from_hf_config(args.hf_config)  # hyper-parameters only
    assert all(not key.startswith("hf_") for key in TransformerDecoder(args).state_dict())


@pytest.mark.parametrize("read", ["read_hf_model_args", "from_hf_config"])
def test_fsdp_gather_full_model_keeps_every_key(source, tmp_path, read):
    """The distributed recipes build the sharded model from args read by rank 0 and every rank; the save goes
    through `gather_full_model`, which rebuilds a model from those args. `from_hf_config` is what the recipes call
    today: config.json is kept through it, generation_config.json only through `read_hf_model_args`."""
    import torch.distributed as dist

    from mytune.training import distributed

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    args = read_hf_model_args(source) if read == "read_hf_model_args" else \
        ModelArgs.from_hf_config(read_hf_config(source))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = TransformerDecoder(args)
        distributed.shard_model(model, bf16=False, cpu_offload=False)
        distributed.load_full_state_dict(model, load_hf_model(source).state_dict(), torch.device("cpu"))
        full = distributed.gather_full_model(model)
        out = save_hf_checkpoint(full, tmp_path / "out", dtype=torch.float32)
    finally:
        dist.destroy_process_group()
    if read == "read_hf_model_args":
        assert_keys_kept(source, out, "float32")
    else:
        before, after = _read(source, "config.json"), _read(out, "config.json")
        assert all(after[key] == (value if key not in DTYPE_KEYS else "float32") for key, value in before.items())


@pytest.mark.parametrize("text, message", [("[1, 2]", "must be a JSON object of settings, got a list"),
                                           ("{not json", "invalid JSON")])
def test_a_damaged_generation_config_is_one_line(source, tmp_path, text, message):
    from mytune.errors import MytuneError

    damaged = tmp_path / "damaged"
    save_hf_checkpoint(load_hf_model(source), damaged, dtype=torch.float32)
    (damaged / "generation_config.json").write_text(text)
    with pytest.raises(MytuneError, match=message):
        load_hf_model(damaged)
