"""FSDP2 helpers for the distributed recipes: process group, sharding, full-state-dict load and save.

The recipes keep their training loop; what lives here is what every FSDP recipe must do the same way:
- `init_distributed`: the process group from torchrun's environment (gloo on CPU, nccl on CUDA), or a group of one
  when the recipe is started without torchrun;
- `shard_model`: `fully_shard` on every decoder layer and then on the root, with bf16 mixed precision (parameters
  stay float32 and sharded, compute in bf16) and optional CPU offload;
- `load_full_state_dict`: rank 0 holds the whole state dict on the CPU, every rank receives only its shards;
- `gather_full_state_dict`: the inverse, for saving: rank 0 gets the full state dict on the CPU;
  `gather_full_model` puts it in a CPU `TransformerDecoder`.

QLoRA (frozen NF4 base, torchao `NF4Tensor`) goes through the same calls; the recipe passes `quantize_base=True`
to `apply_lora` (rank 0's model too, with `device=` the training device, to quantize exactly as single-device QLoRA)
and saves from `gather_full_state_dict`:
- build the meta model with `apply_lora(..., quantize_base=True)` (NF4 on the meta device allocates nothing);
- `shard_model` re-blocks each NF4 weight's scale factors so that every rank's dim-0 shard holds whole blocks
  (`nf4_for_shards`: the same quantized bytes, each double-quantization factor repeated; dequantizes bit for bit
  the same) and `fully_shard` then splits the NF4 tensor on dim 0 (torchao implements FSDP2's all-gather hooks);
- `load_full_state_dict` takes rank 0's state dict with those weights either in full precision (quantized here,
  on `device`, the WHOLE tensor at once: bit-identical to single-device `to_nf4`) or already as `NF4Tensor`s
  (rank 0 built its CPU model with `quantize_base=True`: needed for QDoRA, whose magnitude init reads the
  dequantized NF4 weight); rank 0 broadcasts the NF4 bytes (1/8 of float32) and each rank keeps its dim-0 chunk;
- `gather_full_state_dict` gathers those weights as full `NF4Tensor`s: assign them (`load_state_dict(...,
  assign=True)`) into a CPU model built with `apply_lora(..., quantize_base=True)` (`LoRALinear.dense_weight` and
  `merge_lora` dequantize), or call `.get_original_weight()` for the float weight. Use it rather than
  `get_model_state_dict(full_state_dict=True)`, whose NF4 all-gather leaks (see `gather_full_state_dict`).
Each NF4 weight needs rows divisible by the world size and a multiple of 64 elements per rank (true of real
models on 2/4/8 ranks), and the world needs 2+ processes (FSDP2's world-of-one path cannot unshard NF4); otherwise
`shard_model` raises a MytuneError.
"""

import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mytune.errors import MytuneError
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


def shard_model(model: TransformerDecoder, *, bf16: bool, cpu_offload: bool,
                reshard_after_forward: bool = True, prefetch: bool = True, mesh=None) -> TransformerDecoder:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm and head form the root's group).

    With `bf16`, parameters stay float32 (the sharded master copy the optimizer updates) and are cast to bf16 for
    the forward/backward; gradients are reduced in float32. With `cpu_offload`, sharded parameters, gradients and
    optimizer state live on the CPU and are copied to the GPU one layer at a time.

    `reshard_after_forward` frees each layer's gathered weights after its forward and gathers them again in the
    backward (ZeRO-3: the least memory); False keeps them from the forward to the backward (one all-gather per
    layer and step instead of two, for a whole unsharded model per rank). Either way the last layer keeps its
    weights (the backward starts with it) and the root's are kept by FSDP itself. `prefetch` issues layer i+1's
    all-gather before layer i computes (forward) and layer i-1's before layer i's backward, so communication
    overlaps compute even when the host does not run ahead of the GPU (e.g. right after a host sync).

    `mesh`: the 1-D data-parallel mesh to shard over (`tensor_parallel.mesh_dim(mesh, "dp")` under tensor
    parallelism, called after `apply_tensor_parallel`; it may hold one rank, which keeps FSDP's mixed precision);
    None: every rank of the default group.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    _prepare_nf4_for_sharding(model, mesh.size() if mesh is not None else dist.get_world_size())
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    offload_policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    layers = list(model.model.layers)
    for index, layer in enumerate(layers):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy,
                    reshard_after_forward=reshard_after_forward and index < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    if prefetch:
        for previous, layer in zip(layers, layers[1:]):
            previous.set_modules_to_forward_prefetch([layer])
            layer.set_modules_to_backward_prefetch([previous])
    return model


def load_full_state_dict(model: TransformerDecoder, full_state_dict: dict[str, torch.Tensor] | None,
                         device: torch.device) -> None:
    """Fill a sharded model (built on the meta device) from the full state dict that rank 0 holds on the CPU.

    Other ranks pass None. Each rank allocates only its shards on `device` (`to_empty`), then rank 0 broadcasts
    the weights and every rank keeps its shards; the RoPE tables (a non-persistent buffer) are rebuilt on `device`.
    NF4 weights (QLoRA) are loaded by `_load_nf4_weights` (see the module docstring); the keys must match exactly.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)  # keeps an FSDP-sharded tied lm_head/embedding pair tied (one Parameter)
    if model.args.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.tie_weights()  # plain (unsharded) parameters: to_empty made two
    nf4_keys = [f"{name}.{attr}" for name, _, attr in _nf4_weights(model)]
    if full_state_dict is not None:
        _check_keys(model, full_state_dict)
        full_state_dict = dict(full_state_dict)
    nf4_values = [full_state_dict.pop(key) if full_state_dict is not None else None for key in nf4_keys]
    _load_nf4_weights(model, nf4_values, device)
    # strict=False only because the NF4 keys were taken out (rank 0 checked the keys above): each NF4 weight is
    # then copied onto itself, a no-op.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not nf4_keys)
    set_model_state_dict(model, full_state_dict or {}, options=options)
    model.model.rotary_emb.reset_parameters(device)


def _check_keys(model: nn.Module, full_state_dict: dict[str, torch.Tensor]) -> None:
    """Rank 0: the state dict must have exactly the model's keys (what `strict=True` checks)."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(full_state_dict)), sorted(set(full_state_dict) - expected)
    if missing or unexpected:
        raise MytuneError(f"load_full_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def _is_nf4(tensor: torch.Tensor) -> bool:
    """Whether `tensor` (or a DTensor's local shard) is a torchao `NF4Tensor` (torchao imported only if so)."""
    local = getattr(tensor, "_local_tensor", tensor)
    return type(local).__name__ == "NF4Tensor"


def _nf4_weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every NF4 parameter, in model order."""
    return [(name, module, attr) for name, module in model.named_modules()
            for attr, param in module.named_parameters(recurse=False) if _is_nf4(param)]


def _torchao_nf4():
    """torchao's NF4Tensor class and its constructor-arguments helper, wherever this torchao version keeps them."""
    import importlib

    from mytune.torchao_import import quiet_torchao_import

    with quiet_torchao_import():
        from torchao.quantization import NF4Tensor

    return NF4Tensor, importlib.import_module(NF4Tensor.__module__).construct_nf4_args


def nf4_for_shards(weight: torch.Tensor, world_size: int) -> torch.Tensor:
    """`weight` (an NF4Tensor) re-expressed so that each of `world_size` equal dim-0 chunks holds whole blocks.

    NF4 quantizes blocks of 64 values with one scale each, and those scales are quantized again in groups of
    `scaler_block_size` with one float factor per group. A dim-0 chunk must not split a group, so the group shrinks
    to gcd(group, blocks per chunk) and each factor is repeated: the same bytes and factors, so dequantization is
    bitwise unchanged (each scale is divided by the very same factor). Works on the meta device too.
    """
    NF4Tensor, construct_nf4_args = _torchao_nf4()

    rows, cols = weight.shape
    if rows % world_size or (rows // world_size * cols) % weight.block_size:
        raise MytuneError(
            f"quantize_base: a weight of shape {tuple(weight.shape)} cannot be sharded in NF4 over {world_size} "
            f"ranks (needs rows divisible by {world_size} and a multiple of {weight.block_size} elements per rank); "
            f"use another number of processes or quantize_base=false"
        )
    blocks_per_shard = rows // world_size * cols // weight.block_size
    group = math.gcd(weight.scaler_block_size, blocks_per_shard)
    if group == weight.scaler_block_size:
        return weight
    factor = weight.quantization_factor.repeat_interleave(weight.scaler_block_size // group)
    return NF4Tensor(*construct_nf4_args(weight, {"scaler_block_size": group, "quantization_factor": factor}))


def _prepare_nf4_for_sharding(model: nn.Module, world_size: int) -> None:
    """Before `fully_shard`: every NF4 weight re-blocked by `nf4_for_shards` (raises if one cannot be sharded).

    A world of one is refused: FSDP2's single-process path skips the all-gather and hands a tensor subclass one
    all-gather output where NF4 has three (torchao's `fsdp_post_all_gather` fails to unpack them).
    """
    nf4_weights = _nf4_weights(model)
    if nf4_weights and world_size == 1:
        raise MytuneError("quantize_base=true under FSDP needs 2 or more processes (FSDP2 does not run NF4 weights "
                          "in a world of one); start it with torchrun, or use lora_finetune_single_device")
    for _, module, attr in nf4_weights:
        weight = nf4_for_shards(getattr(module, attr), world_size)
        setattr(module, attr, nn.Parameter(weight, requires_grad=False))


def _load_nf4_weights(model: nn.Module, values: list[torch.Tensor | None], device: torch.device) -> None:
    """Rank 0's full weights (float or NF4; None on other ranks) -> each rank's NF4 dim-0 shard, in the model.

    Rank 0 quantizes a float weight whole on `device` (as single-device QLoRA does), re-blocks it like the sharded
    meta weight and broadcasts its five inner tensors; every rank keeps (copies) its chunk of the three sharded ones.
    The new DTensor parameters replace the old; FSDP picks them up at its lazy init (the first forward).
    """
    from torch.distributed.tensor import DTensor
    NF4Tensor, construct_nf4_args = _torchao_nf4()

    from mytune.modules.lora import to_nf4

    for (_, module, attr), value in zip(_nf4_weights(model), values):
        sharded = getattr(module, attr)
        local, mesh = sharded.to_local(), sharded.device_mesh
        world_size, rank = mesh.size(), mesh.get_local_rank()
        names = local.__tensor_flatten__()[0]  # quantized_data, scaler_mean, quantization_factor, ...
        if value is not None:
            if not _is_nf4(value):  # quantized whole, in the model's dtype, on `device`: single-device `to_nf4`
                value = to_nf4(value.detach().to(device=device, dtype=sharded.dtype))
            elif value.dtype != sharded.dtype:
                raise MytuneError(f"load_full_state_dict: an NF4 weight of dtype {value.dtype} for a model whose "
                                  f"NF4 weights are {sharded.dtype}; build both models in the same dtype")
            full = nf4_for_shards(value.to(device), world_size)
            inner = {name: getattr(full, name).contiguous() for name in names}
        else:
            inner = {name: torch.empty(_full_inner_shape(local, name, world_size), dtype=getattr(local, name).dtype,
                                       device=device) for name in names}
        for name in names:
            dist.broadcast(inner[name], src=0, group=mesh.get_group())
        for name in ("quantized_data", "quantized_scalers", "quantization_factor"):
            inner[name] = inner[name].chunk(world_size)[rank].clone()
        shard = NF4Tensor(*construct_nf4_args(local, {**inner, "device": torch.device(device)}))
        dtensor = DTensor.from_local(shard, mesh, sharded.placements, run_check=False, shape=sharded.shape,
                                     stride=sharded.stride())
        setattr(module, attr, nn.Parameter(dtensor, requires_grad=False))


def _full_inner_shape(local: torch.Tensor, name: str, world_size: int) -> torch.Size:
    """The shape of the unsharded NF4 inner tensor `name` (the sharded ones are split on their only dim)."""
    shape = getattr(local, name).shape
    if name in ("quantized_data", "quantized_scalers", "quantization_factor"):
        return torch.Size((shape[0] * world_size,))
    return shape


def gather_full_model(model: TransformerDecoder,
                      prepare: Callable[[TransformerDecoder], None] | None = None) -> TransformerDecoder | None:
    """All ranks gather the sharded weights; rank 0 gets a CPU `TransformerDecoder` holding them, others None.

    A collective: every rank must call it. The returned model is built on the meta device and takes the gathered
    CPU tensors as its parameters (no copy), so `save_hf_checkpoint` can write it. `prepare` gives that meta model
    the structure the sharded one has before the tensors go in (the LoRA recipe passes its `apply_lora`).
    """
    full = gather_full_state_dict(model)
    if full is None:
        return None
    with torch.device("meta"):
        cpu_model = TransformerDecoder(model.args)
    if prepare is not None:
        prepare(cpu_model)
    cpu_model.load_state_dict(full, strict=True, assign=True)
    if model.args.tie_word_embeddings:
        cpu_model.tie_weights()
    cpu_model.model.rotary_emb.reset_parameters("cpu")
    return cpu_model


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """All ranks gather the sharded state dict one tensor at a time; rank 0 gets it on the CPU, the others None.

    A collective: every rank must call it. What `get_model_state_dict(full_state_dict=True, cpu_offload=True)`
    returns, except that NF4 weights come back as full `NF4Tensor`s gathered by `_gather_nf4`: DTensor's own
    all-gather of an NF4 shard (torch 2.13, torchao 0.18) never waits on its collectives, and each save would then
    keep the gathered NF4 bytes alive on every rank until the process exits.
    """
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor

    is_rank_zero, gathered, full = dist.get_rank() == 0, {}, {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if id(value) not in gathered:  # a tied weight is gathered once
                tensor = value
                if isinstance(tensor, DTensor):
                    if tensor.device.type != tensor.device_mesh.device_type:  # CPU-offloaded shards
                        tensor = tensor.to(tensor.device_mesh.device_type)
                    tensor = _gather_nf4(tensor) if _is_nf4(tensor) else tensor.full_tensor()
                    if isinstance(tensor, AsyncCollectiveTensor):
                        tensor = tensor.wait()
                gathered[id(value)] = tensor.detach().cpu() if is_rank_zero else None
            if is_rank_zero:
                full[key] = gathered[id(value)]
    return full if is_rank_zero else None


# `all_gather_into_tensor` warns that it is deprecated where `all_gather_single` (the same call) exists.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def _gather_nf4(weight: torch.Tensor) -> torch.Tensor:
    """The full `NF4Tensor` of a dim-0-sharded NF4 DTensor, gathered with plain (waited) all-gathers."""
    NF4Tensor, construct_nf4_args = _torchao_nf4()

    local, group = weight.to_local(), weight.device_mesh.get_group()
    inner = {}
    for name in ("quantized_data", "quantized_scalers", "quantization_factor"):
        shard = getattr(local, name).contiguous()
        inner[name] = shard.new_empty((shard.numel() * group.size(),))
        _all_gather_single(inner[name], shard, group=group)
    return NF4Tensor(*construct_nf4_args(local, {**inner, "size": weight.shape, "stride": weight.stride(),
                                                  "n_blocks": weight.numel() // local.block_size}))


def decided_by_rank_zero(decide: Callable[[], Any]) -> Any:
    """Run `decide` on rank 0 only and return its (small, picklable) result on every rank, so all ranks agree (e.g.
    on which checkpoint to resume from); a MytuneError it raises is raised on every rank, with rank 0's message."""
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = decide()
        except MytuneError as err:
            box[1] = str(err)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise MytuneError(box[1])
    return box[0]


@contextmanager
def error_from_rank_zero():
    """Around a check that every rank makes alike (a setting that does not fit the model or the world): its
    MytuneError is raised on rank 0 only, the job's one error line. The other ranks wait to be stopped by torchrun
    once rank 0 has exited: exiting at the same time, one of them may be the failure torchrun sees first, and
    torchrun then kills rank 0 before it prints."""
    try:
        yield
    except MytuneError:
        if dist.get_rank() != 0:
            time.sleep(30)
            raise SystemExit(2) from None
        raise


def reshard(model: nn.Module) -> None:
    """Free the gathered weights every FSDP module of `model` still holds. A forward with no backward (a frozen
    reference, a precompute) leaves the root's and the last layer's weights gathered, kept for a backward that never
    comes: an optimizer built then would hold unsharded parameters, and the memory is that of the whole weights."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


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
