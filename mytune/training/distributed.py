"""FSDP2 helpers for the distributed recipes: process group, sharding, full-state-dict load and save.

The recipes keep their training loop; what lives here is what every FSDP recipe must do the same way:
- `init_distributed`: the process group from torchrun's environment (gloo on CPU, nccl on CUDA), or a group of one
  when the recipe is started without torchrun;
- `shard_model`: `fully_shard` on every decoder layer and then on the root, with bf16 mixed precision (parameters
  stay float32 and sharded, compute in bf16) and optional CPU offload;
- `load_full_state_dict`: rank 0 holds the whole state dict on the CPU, every rank receives only its shards;
- `gather_full_model`: the inverse, for saving: rank 0 gets a CPU `TransformerDecoder` with the full weights.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from mytune.models.transformer import TransformerDecoder


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits: its global rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistributedEnv:
    """Join (or create) the default process group and pick this rank's device.

    Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) the group comes from the environment. Started without torchrun,
    the recipe runs as a world of one, so `python recipe.py` still works. `device_name` is the params value:
    auto (with CUDA there) and cuda become `cuda:LOCAL_RANK`; cpu uses gloo. On CUDA the group also gets a gloo
    backend for CPU tensors (CPU-offloaded gradients are clipped with a CPU all-reduce).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        from mytune.errors import ConfigError

        raise ConfigError(f"device={device_name!r}: FSDP runs on cpu or cuda; use device=cpu, cuda or auto")

    if not dist.is_initialized():
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistributedEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def shard_model(model: TransformerDecoder, *, bf16: bool, cpu_offload: bool) -> TransformerDecoder:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm and head form the root's group).

    With `bf16`, parameters stay float32 (the sharded master copy the optimizer updates) and are cast to bf16 for
    the forward/backward; gradients are reduced in float32. With `cpu_offload`, sharded parameters, gradients and
    optimizer state live on the CPU and are copied to the GPU one layer at a time.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    offload_policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp_policy, offload_policy=offload_policy)
    fully_shard(model, mp_policy=mp_policy, offload_policy=offload_policy)
    return model


def load_full_state_dict(model: TransformerDecoder, full_state_dict: dict[str, torch.Tensor] | None,
                         device: torch.device) -> None:
    """Fill a sharded model (built on the meta device) from the full state dict that rank 0 holds on the CPU.

    Other ranks pass None. Each rank allocates only its shards on `device` (`to_empty`), then rank 0 broadcasts
    the weights and every rank keeps its shards; the RoPE tables (a non-persistent buffer) are rebuilt on `device`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)  # keeps a tied lm_head/embedding pair tied (one Parameter, sharded once)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full_state_dict or {}, options=options)
    model.model.rotary_emb.reset_parameters(device)


def gather_full_model(model: TransformerDecoder) -> TransformerDecoder | None:
    """All ranks gather the sharded weights; rank 0 gets a CPU `TransformerDecoder` holding them, others None.

    A collective: every rank must call it. The returned model is built on the meta device and takes the gathered
    CPU tensors as its parameters (no copy), so `save_hf_checkpoint` can write it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        cpu_model = TransformerDecoder(model.args)
    cpu_model.load_state_dict(full, strict=True, assign=True)
    if model.args.tie_word_embeddings:
        cpu_model.tie_weights()
    cpu_model.model.rotary_emb.reset_parameters("cpu")
    return cpu_model


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (one collective for a few scalars), in float64."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
