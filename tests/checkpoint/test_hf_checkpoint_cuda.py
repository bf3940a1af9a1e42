"""The same checkpoint checks on a CUDA device (skipped without one): loading straight onto the GPU in bf16."""

import pytest
import torch

from mytune.checkpoint import load_hf_model, save_hf_checkpoint
from mytune.generation import generate
from tests.models.hf_reference import make_hf_model, random_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("family", ["llama3_gqa_scaled_rope", "qwen3_qk_norm_head_dim", "qwen2_bias_tied"])
def test_cuda_bf16_load_matches_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    make_hf_model(family).save_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16, attn_implementation="sdpa")
    hf = hf.cuda().eval()
    ours = load_hf_model(tmp_path / "hf", device="cuda", dtype=torch.bfloat16).eval()
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours.model.rotary_emb.inv_freq.is_cuda and ours.model.rotary_emb.inv_freq.dtype == torch.float32
    tokens = random_tokens().cuda()
    with torch.no_grad():
        expected, actual = hf(tokens).logits.float(), ours(tokens).float()
    assert (expected - actual).abs().max() < 0.05

    out = save_hf_checkpoint(ours, tmp_path / "ours")
    reloaded = load_hf_model(out, device="cuda:0", dtype=torch.bfloat16)
    for key, value in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    prompt = random_tokens(batch=2, seq=8).cuda()
    assert generate(ours, prompt, max_new_tokens=8).shape == (2, 16)
