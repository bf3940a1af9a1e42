"""Tensor parallelism (Megatron-style, on PyTorch's DTensor TP APIs) for `TransformerDecoder`, LoRA included.

What is split (`apply_tensor_parallel`, the plan of torchtitan's llama and of Megatron-LM):
- attention: `q_proj`/`k_proj`/`v_proj` column-wise (each rank computes `num_heads / tp` query heads and
  `num_kv_heads / tp` kv heads: GQA groups stay whole on one rank), `o_proj` row-wise (one all-reduce, or a
  reduce-scatter under sequence parallel); the attention itself runs on the local heads unchanged (it takes its head
  count from the projected tensor). Qwen2's q/k/v biases are split with their weights; Qwen3's per-head q/k norms see
  the local heads and keep one replicated weight (a DTensor, so its gradient is summed over the heads of all ranks);
- MLP: `gate_proj`/`up_proj` column-wise, `down_proj` row-wise;
- embeddings, the final norm and `lm_head` stay whole on every rank (replicated; FSDP still shards them over "dp").
  Why a replicated head rather than a column-wise head with loss parallel: the training loss
  (`training.loss.chunked_cross_entropy_sum`) takes the final hidden states and `lm_head.weight` as plain tensors and
  runs unchanged, tied embeddings (Llama 3.2, small Qwen) need nothing special, and the gradients of these
  parameters are identical on every tp rank (the same computation on the same data). The price: the head's matmul
  is repeated on each tp rank (Llama 3.1 8B: ~7% of the step's matmul FLOPs, 70B: ~1.5%) and the head's and embedding's
  memory is divided by dp only. Loss parallel (a `Shard(-1)` head under `loss_parallel()`) would need a DTensor-aware
  chunked loss: a later step if the head shows up in profiles;
- sequence parallel (option): the residual stream between blocks is sharded on the sequence dimension; the two
  norms of each layer run on 1/tp of the tokens (`SequenceParallel`), the all-reduce after `o_proj`/`down_proj`
  becomes a reduce-scatter and an all-gather before the q/k/v and gate/up projections (same bytes, but activations
  outside the matmuls are divided by tp). It needs the sequence length divisible by tp (a one-line error otherwise).

LoRA: an adapter follows its base layer (`LoRALinear` gets its own column-/row-wise style): column-wise base ->
`lora_B` split on its output dim, `lora_A` replicated; row-wise base -> `lora_A` split on its input dim, `lora_B`
replicated. The adapter's output then has the base output's placement and is added to it before the layer's one
all-reduce. DoRA works unchanged on DTensors: its magnitude is split like the base's output (column-wise) or
replicated (row-wise), and the row norm of `W + s B A` is a local norm for a column-wise base (whole rows) and is
reduced over the tp ranks by DTensor for a row-wise one. QLoRA (NF4) under TP is refused with one line: not built (a
row-wise layer would split each NF4 weight by columns, through its 64-value quantization blocks; FSDP's dim-0 split
needed `distributed.nf4_for_shards` to stay exact, and no such layout exists for a column split).

Recipe order (see `make_device_mesh`): mesh -> meta model -> `apply_lora` -> `apply_tensor_parallel(model,
mesh["tp"])` -> `fully_shard` over `mesh["dp"]` -> `distributed.load_full_state_dict` (DTensor-aware: each
parameter is cut to its (dp, tp) shard) -> train; save with `distributed.gather_full_state_dict` (`full_tensor()`).
Every rank of one tp group must see the same batch (data sharded by the dp rank) and use the same seed (dropout of
replicated activations must agree). `clip_grad_norm_` here handles mixed DTensor/plain gradients.

Activation memory per GPU, estimated (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", bytes per layer for bf16 activations without recomputation: s*b*h*(34 + 5*a*s/h); with
flash/SDPA the 5*a*s/h score term is gone, leaving 34*s*b*h; with TP degree t the parts inside attention/MLP (24 of
the 34) are divided by t, and with sequence parallel all 34 are):

    per layer, bf16, b=1:  FSDP alone 34*s*h   FSDP x TP (t)  (10 + 24/t)*s*h   FSDP x TP + SP  34*s*h/t

    Llama 3.1 8B  (h=4096, 32 layers)  8k tokens:  FSDP 36.5 GB   TP8 14.0 GB   TP8+SP 4.6 GB
                                      32k tokens:  FSDP 146 GB    TP8 56 GB     TP8+SP 18 GB
    Llama 3.1 70B (h=8192, 80 layers)  8k tokens:  FSDP 183 GB    TP8 70 GB     TP8+SP 23 GB
                                      32k tokens:  FSDP 730 GB    TP8 279 GB    TP8+SP 91 GB

(34*s*h bytes per layer = 34 * 8192 * 4096 B = 1.14 GB for 8B at 8k, x32 layers; the MLP's intermediate is wider
than 4h in Llama 3 (14336 = 3.5h, SwiGLU's three matrices), which the 34 only roughly covers.) With full activation
checkpointing only each layer's input (2*s*h bytes, /t under SP) stays per layer, plus one layer's working set:
FSDP 70B at 32k then keeps 80 * 2 * 32768 * 8192 B = 43 GB of layer inputs + 9 GB for the layer being recomputed,
which is why TP (with SP: 5.4 GB + 1.1 GB at t=8) is what makes 70B at 32k tokens fit next to the sharded weights.
"""

import math
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from mytune.errors import MytuneError
from mytune.models.transformer import ModelArgs, TransformerDecoder
from mytune.modules.lora import LoRALinear


def make_device_mesh(world_size: int, tensor_parallel_dim: int, device_type: str, *, keep_dp: bool = False):
    """The device mesh for `world_size` processes: ("dp", "tp") of shape (world_size // tp, tp), tp innermost (the
    ranks of one tp group are neighbours: on one node, with NVLink); 1-D ("dp",) or ("tp",) when the other is 1.

    tp ranks: `mesh["tp"]` (absent at tp=1); FSDP over `mesh["dp"]` (absent when dp=1: then no FSDP is needed).
    `keep_dp`: a ("dp", "tp") mesh at dp=1 too (tp > 1), so that a recipe can always `fully_shard` over
    `mesh["dp"]` (one rank: nothing is split, but FSDP's bf16 mixed precision and float32 masters stay as at dp > 1).
    The default process group must exist (`distributed.init_distributed`) with `world_size` ranks.
    """
    from torch.distributed.device_mesh import init_device_mesh

    tp = tensor_parallel_dim
    if tp < 1 or world_size % tp:
        raise MytuneError(f"tensor_parallel_dim={tp} must be a positive divisor of the number of processes "
                          f"({world_size}); e.g. tensor_parallel_dim={math.gcd(world_size, 8)}")
    dp = world_size // tp
    if tp == 1:
        return init_device_mesh(device_type, (dp,), mesh_dim_names=("dp",))
    if dp == 1 and not keep_dp:
        return init_device_mesh(device_type, (tp,), mesh_dim_names=("tp",))
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


def mesh_dim(mesh, name: str):
    """The 1-D sub-mesh `name` ("dp" or "tp") of a `make_device_mesh` mesh, or None when that dimension is 1."""
    names = mesh.mesh_dim_names or ()
    return mesh[name] if name in names else None


def check_tensor_parallel(args: ModelArgs, tp: int) -> None:
    """One-line MytuneError naming the model field that `tp` does not divide (heads, kv heads, MLP width)."""
    sizes = {"num_attention_heads": args.num_attention_heads, "num_key_value_heads": args.kv_heads,
             "intermediate_size": args.intermediate_size}
    for field, size in sizes.items():
        if size % tp:
            divisors = [d for d in range(1, 65) if all(s % d == 0 for s in sizes.values())]
            raise MytuneError(f"tensor_parallel_dim={tp} does not divide the model's {field}={size}; use one of "
                              f"{divisors} (the divisors of num_attention_heads, num_key_value_heads and "
                              f"intermediate_size)")


def apply_tensor_parallel(model: TransformerDecoder, tp_mesh, *, sequence_parallel: bool = False) -> TransformerDecoder:
    """Split every decoder layer of `model` over the 1-D `tp_mesh` (in place; see the module docstring for the plan).

    Call it on the meta-device model (before FSDP and before loading weights) or on a real model whose weights are
    the same on every rank (`distribute_tensor` then cuts them). A `tp_mesh` of None or of one rank changes nothing,
    so a recipe may call `apply_tensor_parallel(model, mesh_dim(mesh, "tp"))` at any tp. Returns `model`.
    """
    tp = tp_mesh.size() if tp_mesh is not None else 1
    if tp == 1:
        return model
    check_tensor_parallel(model.args, tp)
    _refuse_unsupported_lora(model)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    seq_shard = Shard(1) if sequence_parallel else Replicate()
    for layer in model.model.layers:
        plan = {
            "self_attn.q_proj": _Colwise(), "self_attn.k_proj": _Colwise(), "self_attn.v_proj": _Colwise(),
            "self_attn.o_proj": _Rowwise(output_layouts=seq_shard),
            "mlp.gate_proj": _Colwise(), "mlp.up_proj": _Colwise(),
            "mlp.down_proj": _Rowwise(output_layouts=seq_shard),
        }
        if layer.self_attn.q_norm is not None:  # [b, s, local heads, head_dim]: the heads (dim 2) are split
            plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if sequence_parallel:
            plan.update({
                "input_layernorm": SequenceParallel(),
                "post_attention_layernorm": SequenceParallel(),
                # gather the sequence once per block, for all three projections (one reduce-scatter backward)
                "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None, None),
                                                desired_input_layouts=(Replicate(), None, None, None, None, None)),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(layer, tp_mesh, plan)
    if sequence_parallel:
        parallelize_module(model.model, tp_mesh, {
            # each rank keeps its slice of the sequence (no communication); the backward all-gathers
            "embed_tokens": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
            # the final norm and the replicated head see the whole sequence again
            "norm": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                       use_local_output=True),
        })
        model.register_forward_pre_hook(_sequence_length_check(tp), with_kwargs=True)
    # SequenceParallel re-registers a norm's weight as a new nn.Parameter, which requires grad (torch 2.13): a
    # frozen norm (LoRA) would start training.
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return model


def _sequence_length_check(tp: int):
    """A forward pre-hook: sequence parallel cuts the sequence in tp equal parts, so its length must divide."""
    def hook(module, args, kwargs):
        tokens = args[0] if args else kwargs["tokens"]
        if tokens.shape[1] % tp:
            raise MytuneError(f"sequence_parallel with tensor_parallel_dim={tp} needs the sequence length "
                              f"({tokens.shape[1]}) to be a multiple of {tp}; pad batches to a multiple of {tp} "
                              f"or turn sequence_parallel off")
    return hook


def _refuse_unsupported_lora(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.quantized:
            raise MytuneError(f"QLoRA (quantize_base=true) is not supported with tensor_parallel_dim > 1 ({name} "
                              f"holds NF4 weights); set quantize_base=false or tensor_parallel_dim=1")


def _distribute_lora(module: LoRALinear, mesh, placements: dict[str, object]) -> None:
    """Replace `module`'s parameters by DTensors: `placements` maps "weight", "bias", "lora_A", "lora_B" and
    "lora_magnitude_vector" to a placement (what is frozen stays frozen)."""
    owners = {"weight": (module, "weight"), "bias": (module, "bias"),
              "lora_magnitude_vector": (module, "lora_magnitude_vector"),
              "lora_A": (module.lora_A, "weight"), "lora_B": (module.lora_B, "weight")}
    for key, (owner, attr) in owners.items():
        param = getattr(owner, attr)
        if param is None:
            continue
        dtensor = distribute_tensor(param.detach(), mesh, [placements[key]])
        owner.register_parameter(attr, nn.Parameter(dtensor, requires_grad=param.requires_grad))


class _Colwise(ColwiseParallel):
    """`ColwiseParallel` that also splits a `LoRALinear`: weight, bias, `lora_B` (and a DoRA magnitude) on the output
    dim, `lora_A` replicated; input replicated, output sharded on the last dim, as for a plain `nn.Linear`."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, LoRALinear):
            return super()._apply(module, device_mesh)
        shard = Shard(0)
        _distribute_lora(module, device_mesh, {"weight": shard, "bias": shard, "lora_magnitude_vector": shard,
                                               "lora_A": Replicate(), "lora_B": shard})
        return distribute_module(
            module, device_mesh, None,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class _Rowwise(RowwiseParallel):
    """`RowwiseParallel` that also splits a `LoRALinear`: weight and `lora_A` on the input dim, bias, `lora_B` (and
    a DoRA magnitude) replicated; input sharded on the last dim, output partial sums reduced as for `nn.Linear`."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, LoRALinear):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)
        _distribute_lora(module, device_mesh, {"weight": Shard(1), "bias": Replicate(),
                                               "lora_magnitude_vector": Replicate(), "lora_A": Shard(1),
                                               "lora_B": Replicate()})
        return distribute_module(
            module, device_mesh, None,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a model whose gradients mix plain tensors and DTensors on different
    meshes (TP-split, FSDP-sharded and replicated parameters): returns the total L2 norm (a plain float32 tensor).

    torch's own function stacks the norms of all gradients into one tensor and scales them with one plain tensor,
    which fails as soon as plain tensors and DTensors (or two meshes) meet. Here the gradients of one (mesh,
    placements) share one norm reduction, and a replicated gradient (the same on every rank) counts once.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for param in parameters:
        grad = param.grad
        if grad is not None:
            key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else grad.device
            groups.setdefault(key, []).append(grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float())
    if not norms:
        return torch.zeros(())
    device = norms[0].device
    total = torch.stack([norm.to(device) for norm in norms]).square().sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for key, grads in groups.items():
        if isinstance(key, tuple):
            mesh = key[0]  # the local shards' device (the CPU under FSDP's CPU offload), not the mesh's
            scale = DTensor.from_local(coef.to(grads[0].to_local().device), mesh, [Replicate()] * mesh.ndim,
                                       run_check=False)
        else:
            scale = coef.to(key)
        for grad in grads:
            grad.mul_(scale)
    return total
