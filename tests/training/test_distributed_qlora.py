"""QLoRA (NF4 base) under FSDP2 on 2 CPU processes (gloo), built the way `lora_finetune_distributed` builds its model.

Rank 0 builds the seeded LoRA model and hands its state dict to `load_full_state_dict`; every rank builds the same
model on the meta device with `quantize_base=True`, shards it and receives its NF4 shards. Checked against one
process running single-device QLoRA on the same global batch:
- each rank's NF4 shard, and the gathered NF4 weights, dequantize bit for bit to single-device `to_nf4`;
- two forward/backward/AdamW steps give the same losses and adapter gradients (1e-5, float32);
- the save path (`gather_full_state_dict`, then a CPU LoRA model on rank 0, `merge_lora`, `lora_state_dict`) gives
  the single-process merged weights and adapter.
Two variants of rank 0's state dict: float base weights (quantized by `load_full_state_dict`, LoRA) and NF4 base
weights (rank 0's model built with `quantize_base=True`, as QDoRA needs for its magnitude init; DoRA).

The workers are this file run as a script (`python test_distributed_qlora.py RANK OUT_DIR`), both variants in one
launch (most of the time is the start-up of the processes).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # as a worker script
    sys.path.insert(0, str(REPO))

from mytune.models import TransformerDecoder, model_args  # noqa: E402
from mytune.modules.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora, trainable_parameters  # noqa: E402
from mytune.training.loss import count_label_tokens, cross_entropy_sum  # noqa: E402

WORLD_SIZE = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ_LEN, STEPS, LR = 4, 16, 2, 1e-2
# variant -> whether rank 0's model is quantized (its state dict holds NF4Tensors) and the adapters are DoRA
VARIANTS = {"float_lora": False, "nf4_dora": True}


def tiny_args():
    """llama_tiny with 2 layers: every targeted weight has 32+ rows per rank and 64-element blocks per shard."""
    args = model_args("llama_tiny")
    args.num_hidden_layers = 2
    return args


def apply_adapters(model: TransformerDecoder, *, quantize: bool, dora: bool) -> None:
    apply_lora(model, TARGETS, rank=4, alpha=8.0, use_dora=dora, quantize_base=quantize)


def seeded_model(*, quantize: bool, dora: bool) -> TransformerDecoder:
    """The seeded random base plus adapters (what rank 0, and single-device QLoRA with quantize=True, build)."""
    torch.manual_seed(0)
    model = TransformerDecoder(tiny_args())
    apply_adapters(model, quantize=quantize, dora=dora)
    return model


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, tiny_args().vocab_size, (BATCH, SEQ_LEN), generator=generator)
    labels = tokens.clone()
    labels[:, :3] = -100  # some ignored positions, unevenly many per sample
    labels[1, :9] = -100
    return tokens, labels


def train(model: TransformerDecoder, tokens: torch.Tensor, labels: torch.Tensor, *, world_size: int,
          all_reduce=lambda x: x) -> dict:
    """STEPS AdamW steps on this process's part of the global batch, loss normalised by the global label tokens.

    Returns the global losses (and one after the last step) and the adapter gradients of every step (full tensors).
    """
    num_label_tokens = count_label_tokens(global_batch()[1])
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=LR)
    losses, grads = [], []
    for _ in range(STEPS):
        loss = cross_entropy_sum(model(tokens), labels) / num_label_tokens
        (loss * world_size).backward()  # FSDP averages over ranks: scaled back to the sum
        losses.append(float(all_reduce(loss.detach())))
        grads.append({name: full(p.grad).clone() for name, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        losses.append(float(all_reduce(cross_entropy_sum(model(tokens), labels) / num_label_tokens)))
    return {"losses": losses, "grads": grads}


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def nf4_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Dequantized NF4 base weights by state-dict key (local shards for a sharded model)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.quantized:
            weight = module.weight
            out[f"{name}.weight"] = getattr(weight, "_local_tensor", weight).get_original_weight()
    return out


def worker(rank: int, out_dir: Path) -> None:
    """One rank, every variant: results to out_dir/<variant>_rank<N>.pt."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=WORLD_SIZE)
    try:
        for variant in VARIANTS:
            torch.save(run_variant(rank, variant), out_dir / f"{variant}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_variant(rank: int, variant: str) -> dict:
    """The recipe's load path, training, and (rank 0) the gather-for-save path."""
    import torch.distributed as dist

    from mytune.training import distributed

    dora = VARIANTS[variant]
    full_sd = seeded_model(quantize=dora, dora=dora).state_dict() if rank == 0 else None
    with torch.device("meta"):
        model = TransformerDecoder(tiny_args())
    apply_adapters(model, quantize=True, dora=dora)
    distributed.shard_model(model, bf16=False, cpu_offload=False)
    distributed.load_full_state_dict(model, full_sd, torch.device("cpu"))
    result = {"local_nf4": nf4_weights(model)}

    tokens, labels = global_batch()
    mine = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)

    def all_reduce(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value)
        return value

    result.update(train(model, tokens[mine], labels[mine], world_size=WORLD_SIZE, all_reduce=all_reduce))

    full_state = distributed.gather_full_state_dict(model)
    if rank == 0:  # what the recipe's save does with it
        with torch.device("meta"):
            cpu_model = TransformerDecoder(tiny_args())
        apply_adapters(cpu_model, quantize=True, dora=dora)
        cpu_model.load_state_dict(full_state, strict=True, assign=True)
        cpu_model.model.rotary_emb.reset_parameters("cpu")
        result["gathered_nf4"] = nf4_weights(cpu_model)
        result["merged"] = merge_lora(cpu_model).state_dict()
        result["adapter"] = lora_state_dict(cpu_model)
        with torch.no_grad():
            result["gathered_loss"] = float(cross_entropy_sum(cpu_model(tokens), labels)
                                            / count_label_tokens(labels))
    return result


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> Path:
    """Both variants on 2 ranks (the workers); the directory of their results."""
    out_dir = tmp_path_factory.mktemp("fsdp_qlora")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([sys.executable, __file__, str(rank), str(out_dir)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for rank in range(WORLD_SIZE)]
    for proc in workers:
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output[-4000:]
    return out_dir


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_nf4_for_shards_keeps_the_weight_and_splits_into_whole_blocks(world_size):
    from mytune.modules.lora import to_nf4
    from mytune.training.distributed import nf4_for_shards

    weight = torch.randn(96 * world_size, 96, generator=torch.Generator().manual_seed(0))
    nf4 = to_nf4(weight)
    sharded = nf4_for_shards(nf4, world_size)
    dense = nf4.get_original_weight()
    assert torch.equal(sharded.get_original_weight(), dense)  # bit for bit
    assert 144 % sharded.scaler_block_size == 0  # 144 blocks of 64 per rank: whole groups (of 16)
    for rank, chunk in enumerate(sharded.split(weight.shape[0] // world_size)):  # what fully_shard does
        assert torch.equal(chunk.get_original_weight(), dense.chunk(world_size)[rank])
    with torch.device("meta"):  # the sharded meta model gets the same layout
        meta = nf4_for_shards(to_nf4(torch.empty(weight.shape)), world_size)
    assert meta.is_meta and meta.scaler_block_size == sharded.scaler_block_size


def test_nf4_for_shards_refuses_a_weight_it_cannot_split():
    from mytune.errors import MytuneError
    from mytune.modules.lora import to_nf4
    from mytune.training.distributed import nf4_for_shards

    nf4 = to_nf4(torch.randn(6, 64))  # 6 blocks, scales in groups of gcd(6, 256) = 2
    assert nf4_for_shards(nf4, 3) is nf4  # 2 blocks per rank: whole groups already
    assert nf4_for_shards(nf4, 2).scaler_block_size == 1  # 3 blocks per rank
    with pytest.raises(MytuneError, match="cannot be sharded in NF4 over 4 ranks"):
        nf4_for_shards(nf4, 4)  # 6 rows over 4 ranks
    with pytest.raises(MytuneError, match=r"shape \(2, 96\)"):
        nf4_for_shards(to_nf4(torch.randn(2, 96)), 2)  # 96 values per rank: not whole blocks of 64


def test_shard_model_refuses_nf4_in_a_world_of_one():
    import torch.distributed as dist

    from mytune.errors import MytuneError
    from mytune.training.distributed import shard_model

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with torch.device("meta"):
        model = TransformerDecoder(tiny_args())
    apply_adapters(model, quantize=True, dora=False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(MytuneError, match="needs 2 or more processes"):
            shard_model(model, bf16=False, cpu_offload=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp_qlora_matches_single_device(variant, two_rank_results):
    # Single-device QLoRA on the whole global batch.
    dora = VARIANTS[variant]
    reference = seeded_model(quantize=True, dora=dora)
    ref_nf4 = nf4_weights(reference)
    tokens, labels = global_batch()
    ref = train(reference, tokens, labels, world_size=1)
    ref_merged = merge_lora(reference).state_dict()
    ref_adapter = lora_state_dict(reference)

    ranks = [torch.load(two_rank_results / f"{variant}_rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]

    # NF4: each rank's shard and the gathered weight are single-device `to_nf4`, bit for bit.
    assert len(ref_nf4) == 2 * len(TARGETS)
    for key, weight in ref_nf4.items():
        for rank, result in enumerate(ranks):
            assert torch.equal(result["local_nf4"][key], weight.chunk(WORLD_SIZE)[rank]), (key, rank)
        assert torch.equal(ranks[0]["gathered_nf4"][key], weight), key

    # Training: the same losses and adapter gradients as one process on the same global batch.
    loss_diff = max(abs(a - b) for a, b in zip(ranks[0]["losses"], ref["losses"]))
    grad_diff = max(max_diff(a, b) for a, b in zip(ranks[0]["grads"], ref["grads"]))
    assert ranks[0]["losses"] == ranks[1]["losses"]
    merged_diff = max_diff(ranks[0]["merged"], ref_merged)
    adapter_diff = max_diff(ranks[0]["adapter"], ref_adapter)
    print(f"FSDP QLoRA ({variant}) vs single device: max loss diff {loss_diff:.2e}, max grad diff {grad_diff:.2e}, "
          f"merged weights {merged_diff:.2e}, adapter {adapter_diff:.2e}")
    assert loss_diff < 1e-5, (ranks[0]["losses"], ref["losses"])
    assert grad_diff < 1e-5
    assert ref["losses"][-1] < ref["losses"][0]  # the steps did something
    assert max(float(g.abs().max()) for g in ref["grads"][-1].values()) > 1e-4

    # Save path: rank 0's gathered model gives the trained loss, the merged weights and the adapter.
    assert abs(ranks[0]["gathered_loss"] - ref["losses"][-1]) < 1e-5
    # Trained weights: AdamW divides by sqrt(v), so 1e-8 gradient differences on near-zero gradients become ~1e-6.
    assert merged_diff < 5e-5
    assert adapter_diff < 5e-5


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]))
