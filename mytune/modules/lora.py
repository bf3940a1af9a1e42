"""LoRA and DoRA adapters on frozen linear layers, optionally over an NF4-quantized base (QLoRA).

The math, initialisation and parameter names are PEFT's, so an adapter trained here loads into
`peft.PeftModel` with the same outputs (see `mytune.checkpoint.peft`):

    LoRA:  y = x W^T + b + (dropout(x) A^T B^T) * alpha / r     A: [r, in] kaiming-uniform(a=sqrt(5)), B: [out, r] zeros
    DoRA:  y = m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b   m: `lora_magnitude_vector` [out], init ||W||_row,
           the norm detached from the graph (DoRA paper section 4.3, as PEFT does)

`LoRALinear` keeps the wrapped layer's `weight` and `bias` at the same state-dict path (`...q_proj.weight`), so a
Hugging Face checkpoint loads into a LoRA model unchanged; the adapter adds `lora_A.weight`, `lora_B.weight` and
(DoRA) `lora_magnitude_vector` next to them, PEFT's key names minus its `base_model.model.` prefix.

Speed and memory (the same numbers, fewer passes over memory):
- LoRA adds `scale * B(A(dropout(x)))` into the base output with one in-place `addmm_` (the scale folded into the
  matmul), so no output-sized temporary besides the base output exists.
- DoRA's weight norm depends only on the weights, so each layer computes it once and reuses it for every
  micro-batch (and an activation-checkpointing recompute) until the weights change: every optimizer step drops it
  (`LoRALinear.dora_weight_norm` lists the other triggers; `invalidate_dora_norms` for hand edits).
- Every path compiles without graph breaks (`fullgraph=True`); compiled, an NF4 weight is dequantized by one fused
  kernel and recomputed in the backward rather than saved (`nf4_linear`).
"""

import copy
import math
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from mytune.config.names import resolve_lora_targets  # torch-free: the params checks use it too
from mytune.errors import MytuneError
from mytune.torchao_import import quiet_torchao_import

# The adapter's own state-dict entries inside a LoRALinear (PEFT names them the same).
LORA_PARAM_NAMES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

# NF4 (QLoRA paper): 64 weights share one scale; 256 scales share one double-quantization factor.
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256


class LoRALinear(nn.Module):
    """A frozen linear layer (`weight`, `bias`) plus a trainable low-rank update `lora_B @ lora_A` (PEFT's math).

    With `use_dora`, the update is DoRA's: the output is rescaled row-wise by the trainable `lora_magnitude_vector`
    over the detached norm of the combined weight. With a quantized base (`quantize_base` in `from_linear`),
    `weight` is a torchao `NF4Tensor`; the adapter stays in the base layer's compute dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dropout: float = 0.0,
                 use_dora: bool = False, bias: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.use_dora = rank, alpha, use_dora
        self.scaling = alpha / rank
        self.quantized = False
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, out_features, bias=False, **factory)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, **factory))
        else:
            self.register_parameter("lora_magnitude_vector", None)
        # DoRA's cached weight norm (not a buffer: no state-dict key, not sharded) and, for eager calls, the
        # version key of the weights it was computed from; see `dora_weight_norm`.
        self._dora_norm: torch.Tensor | None = None
        self._dora_norm_key: tuple | None = None
        if use_dora:
            _track_dora_layer(self)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # like nn.Linear; from_linear replaces it
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0, use_dora: bool = False,
                    quantize_base: bool = False, device: torch.device | str | None = None) -> "LoRALinear":
        """Wrap `linear`: its weight and bias become this layer's (frozen; NF4 with `quantize_base`), adapter fresh.

        `device` moves the layer there first (default: where `linear` is), so the NF4 conversion runs there.
        """
        weight = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
        with torch.device("meta"):  # the placeholder tensors are replaced right away: allocate nothing
            layer = cls(linear.in_features, linear.out_features, rank=rank, alpha=alpha, dropout=dropout,
                        use_dora=use_dora, bias=linear.bias is not None, dtype=weight.dtype)
        layer.lora_A.to_empty(device=weight.device)
        layer.lora_B.to_empty(device=weight.device)
        if use_dora:
            layer.lora_magnitude_vector = nn.Parameter(torch.empty(linear.out_features, device=weight.device,
                                                                   dtype=weight.dtype))
        layer.quantized = quantize_base
        layer.weight = nn.Parameter(to_nf4(weight) if quantize_base else weight, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(weight.device), requires_grad=False)
        layer.train(linear.training)
        layer.reset_lora_parameters()
        return layer

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform(a=sqrt(5)), B zeros (so the layer starts as the base layer);
        the DoRA magnitude is the row norm of the (unchanged) combined weight."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.invalidate_dora_norm()
        if self.use_dora and not self.weight.is_meta:
            self.lora_magnitude_vector.copy_(self._weight_norm(self.dense_weight(), self.lora_weight()))

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as a plain tensor in `dtype` (default: the adapter's dtype); NF4 is dequantized."""
        dtype = dtype or self.lora_A.weight.dtype
        if self.quantized:
            return self.weight.get_original_weight().to(dtype)
        return self.weight.to(dtype)

    def lora_weight(self) -> torch.Tensor:
        """`B @ A`, `[out, in]`, unscaled."""
        return self.lora_B.weight @ self.lora_A.weight

    def _weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor) -> torch.Tensor:
        """Row-wise L2 norm of `W + scaling * B A` (PEFT's `get_weight_norm`), bit for bit, with one [out, in]
        buffer: `lora_weight` must be a fresh `B @ A` outside autograd; it is scaled and summed into in place
        (fl(s * BA) then fl(. + W), and addition commutes)."""
        return torch.linalg.norm(lora_weight.mul_(self.scaling).add_(weight), dim=1).to(weight.dtype)

    def dora_weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """`||W + scaling * B A||_row` in `dtype`, detached: computed once, then reused until the weights change.

        The norm depends only on the weights, which change at the optimizer step, so the micro-batches of a step
        and an activation-checkpointing recompute share one computation (bitwise the same norm as computing it each
        time). The cache is dropped by every `torch.optim.Optimizer.step` (a global post-step hook), by
        `load_state_dict`, `reset_lora_parameters`, moves/casts (`.to()`), and `invalidate_dora_norms`; eager calls
        also recompute when a weight's version counter or identity changed (an in-place edit under `no_grad`).
        Compiled graphs cannot read version counters without a graph break: after editing adapter weights by hand
        (not by an optimizer or `load_state_dict`) in a compiled model, call `invalidate_dora_norms(model)`.
        FSDP2 re-gathers unsharded weights without bumping their version, so there the optimizer hook is what
        invalidates.

        Compiled, the cache is a side effect of the graph (storing the norm on the module), which dynamo refuses
        inside an activation-checkpointed layer unless `torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_
        checkpoint` is True (safe here: the recompute needs no store). With that flag off, compiled layers compute
        the norm in every call, as before the cache (inductor fuses it with the base weight's dequantization).
        """
        eager = not torch.compiler.is_compiling()
        if not eager and not _graph_may_cache():
            with torch.no_grad():  # no side effect in the graph: computed per call, fused by inductor
                return self._weight_norm(self.dense_weight(dtype), self.lora_weight().to(dtype))
        norm = self._dora_norm
        if norm is None or norm.dtype != dtype or (eager and self._dora_norm_key != self._weights_key(norm)):
            with torch.no_grad():  # detached (DoRA paper 4.3): no graph is built for B @ A
                norm = self._weight_norm(self.dense_weight(dtype), self.lora_weight().to(dtype))
            self._dora_norm = norm
            self._dora_norm_key = self._weights_key(norm) if eager else None
        return norm

    def _weights_key(self, norm: torch.Tensor) -> tuple:
        """What the cached norm depends on, as cheap Python values: identity, version and device of W, A and B, and
        whether an inference-mode norm meets a forward outside inference mode (autograd cannot save it)."""
        tensors = (self.weight, self.lora_A.weight, self.lora_B.weight)
        stale_inference = norm.is_inference() and not torch.is_inference_mode_enabled()
        return (*((id(t), t._version, t.device) for t in tensors), stale_inference)

    def invalidate_dora_norm(self) -> None:
        """Forget the cached DoRA weight norm (the next forward recomputes it)."""
        self._dora_norm = None
        self._dora_norm_key = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._base_forward(x)
        if self.use_dora:
            return self._dora_forward(x, result)
        hidden = self.lora_A(self.lora_dropout(x))
        return _add_lora_output(result, hidden, self.lora_B.weight, self.scaling)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x W^T + b`; an NF4 weight through `nf4_linear`."""
        if self.quantized:
            return nf4_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _dora_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA's output, exactly (bitwise) as PEFT's `DoraLinearLayer.forward` plus the base output computes it:
        `result + (m/||W + s BA|| - 1) * base + m/||W + s BA|| * B(A(x)) * s`, the sums done in place on fresh
        tensors (no autograd-saved tensor is overwritten) and the norm cached (`dora_weight_norm`)."""
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result if self.bias is None else result - self.bias
        else:
            x = self.lora_dropout(x)
            base_result = nf4_linear(x, self.weight) if self.quantized else F.linear(x, self.weight)
        weight_norm = self.dora_weight_norm(x.dtype)
        mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)
        lora_result = self.lora_B(self.lora_A(x))
        delta = (mag_norm_scale - 1) * base_result
        delta.add_((mag_norm_scale * lora_result).mul_(self.scaling))
        return delta.add_(result)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.invalidate_dora_norm()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self.invalidate_dora_norm()
        return super()._apply(fn, recurse)

    def __setstate__(self, state: dict) -> None:
        """Unpickled or deep-copied layers are tracked too (their cache must follow optimizer steps)."""
        super().__setstate__(state)
        self.__dict__.setdefault("_dora_norm", None)  # pickles from before the cache
        self.__dict__.setdefault("_dora_norm_key", None)
        if self.use_dora:
            _track_dora_layer(self)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The plain weight equal to base + adapter (computed in float32, returned in `dtype`, default the adapter's).

        LoRA: `W + s B A`; DoRA: `m / ||W + s B A||_row * (W + s B A)` (PEFT's merge).
        """
        dtype = dtype or self.lora_A.weight.dtype
        weight = self.dense_weight(torch.float32)
        merged = weight + self.scaling * self.lora_weight().float()
        if self.use_dora:
            norm = torch.linalg.norm(merged, dim=1)
            merged = (self.lora_magnitude_vector.float() / norm).view(-1, 1) * merged
        return merged.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout}, use_dora={self.use_dora}, quantized={self.quantized}")

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x W^T + b` for an NF4 `weight`, dequantized to `x.dtype`, never keeping the dequantized weight for the backward.

    Eager: torchao's `linear_nf4` (it saves the NF4 weight and dequantizes again in the backward); the bias is added
    in place. Compiled: the dequantization is a checkpointed region, so inductor fuses it into one kernel (torchao's
    eager dequantization allocates ~7x the dense weight's bytes in int64 indices and intermediates) and recomputes
    it in the backward; without the checkpoint the partitioner would save each dense weight from the forward to the
    backward, which is what QLoRA exists to avoid.
    """
    if torch.compiler.is_compiling():
        dense = torch.utils.checkpoint.checkpoint(_dequantize, weight, x.dtype, use_reentrant=False)
        return F.linear(x, dense, bias)
    result = F.linear(x, weight)  # NF4Tensor's F.linear is torchao's `linear_nf4`
    return result if bias is None else result.add_(bias)


def _dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype)


def _graph_may_cache() -> bool:
    """Whether a compiled DoRA layer may store its norm on the module (see `LoRALinear.dora_weight_norm`)."""
    return bool(torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint)


def _add_lora_output(result: torch.Tensor, hidden: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`result + scaling * hidden @ lora_b^T`, accumulated into `result` by one `addmm_` (scale folded in).

    Equal to `result + B(hidden) * scaling` up to one rounding (fp32: ~1e-7 relative), and the output-sized
    temporaries of `B(hidden)`, `* scaling` and `+` never exist. In place is safe for autograd: `result` is a fresh
    output of `F.linear`/`linear_nf4`, which do not keep their output for the backward. Mixed dtypes (a caller's
    autocast: in-place ops are not autocast) take the plain formula.
    """
    if not result.dtype == hidden.dtype == lora_b.dtype:
        return result + F.linear(hidden, lora_b) * scaling
    flat = result.view(-1, result.shape[-1])
    flat.addmm_(hidden.reshape(-1, hidden.shape[-1]), lora_b.t(), alpha=scaling)
    return result


# Every live DoRA layer, so that an optimizer step anywhere drops their cached weight norms.
_DORA_LAYERS: "weakref.WeakSet[LoRALinear]" = weakref.WeakSet()
_OPTIMIZER_HOOK = None


def _track_dora_layer(layer: LoRALinear) -> None:
    """Register `layer` for invalidation at every optimizer step (installing the global hook once)."""
    global _OPTIMIZER_HOOK
    _DORA_LAYERS.add(layer)
    if _OPTIMIZER_HOOK is None:
        _OPTIMIZER_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Global post-step hook: the weights may have changed, so no DoRA layer may reuse its norm."""
    for layer in list(_DORA_LAYERS):
        layer.invalidate_dora_norm()


def invalidate_dora_norms(model: nn.Module | None = None) -> int:
    """Drop the cached DoRA weight norms of `model`'s layers (default: of every DoRA layer); returns how many.

    Not needed after `optimizer.step()` of a `torch.optim.Optimizer` (a global hook does it), `load_state_dict`
    or `.to()`. Call it after changing adapter or base weights any other way (e.g. `p.copy_()` under `no_grad`,
    or a custom optimizer that is not a `torch.optim.Optimizer`) when the model is compiled or under FSDP.
    """
    layers = [layer for _, layer in lora_layers(model)] if model is not None else list(_DORA_LAYERS)
    for layer in layers:
        layer.invalidate_dora_norm()
    return len(layers)


def apply_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
               use_dora: bool = False, quantize_base: bool = False,
               device: torch.device | str | None = None) -> nn.Module:
    """Replace the `nn.Linear` modules named by `targets` (HF names or aliases) with `LoRALinear`, in place.

    Every other parameter is frozen; only the adapters' `lora_A`, `lora_B` (and DoRA magnitudes) train.
    With `quantize_base`, the targeted layers' base weights are stored in NF4 (QLoRA). `device` moves each targeted
    layer there as it is wrapped (the rest of the model stays put): a model loaded on the CPU then reaches the
    accelerator already quantized, one layer in full precision at a time. The adapters are initialised from the
    global RNG (seed it for reproducibility). Returns `model`.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA layers")
    wanted = set(resolve_lora_targets(targets))
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rpartition(".")[2] in wanted]
    if not found:
        raise MytuneError(f"lora_target_modules {list(targets)} matches no linear layer of this model")
    _refuse_shared_weights(model, found)

    for param in model.parameters():
        param.requires_grad_(False)
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear.from_linear(linear, rank=rank, alpha=alpha, dropout=dropout,
                                                      use_dora=use_dora, quantize_base=quantize_base, device=device))
    return model


def _refuse_shared_weights(model: nn.Module, targets: list[tuple[str, nn.Linear]]) -> None:
    """A tied weight (lm_head = embed_tokens) cannot take an adapter: merging would untie it and save a wrong model."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, linear in targets:
        others = [n for n in owners.get(id(linear.weight), []) if n != f"{name}.weight"]
        if others:
            raise MytuneError(
                f"lora_target_modules: {name} shares its weight with {others[0]} (tie_word_embeddings), so it cannot "
                f"take a LoRA adapter; remove {name.rpartition('.')[2]!r} (or 'output') from lora_target_modules"
            )


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(module name, layer) for every `LoRALinear` of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, by their model state-dict key (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    state = {}
    for name, layer in lora_layers(model):
        for key, tensor in layer.state_dict().items():
            if key in LORA_PARAM_NAMES:
                state[f"{name}.{key}" if name else key] = tensor
    return state


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after `apply_lora`: the adapters), for the optimizer and grad clipping."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def merge_lora(model: nn.Module, *, inplace: bool = False, device: torch.device | str | None = None) -> nn.Module:
    """A model whose `LoRALinear` layers are plain `nn.Linear` holding the merged weights (for an HF save).

    By default `model` is left as is (training can go on): the result shares every other tensor with it, only the
    merged weights are new. `device` places the merged weights (default: the base weight's device), e.g. "cpu" to
    save a large model without a second copy of the targeted weights on the accelerator. With `inplace`, `model`'s
    own layers are replaced. A quantized base is dequantized; merged weights take the adapter's dtype.
    """
    if not inplace:
        shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        model = copy.deepcopy(model, memo=dict(shared))  # copies modules only: tensors are in the memo
    for name, layer in list(lora_layers(model)):
        weight = layer.merged_weight()
        target = torch.device(device) if device is not None else weight.device
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(target), requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().to(target, weight.dtype), requires_grad=False)
        linear.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return model


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as a torchao `NF4Tensor` (block 64, double-quantized scales; dequantizes to `weight.dtype`).

    The scale block is 256 scales when the weight has a multiple of 64 * 256 elements (every real model), else the
    largest power of two that divides the number of blocks (tiny test models).
    """
    if weight.numel() % NF4_BLOCK_SIZE:
        raise MytuneError(f"quantize_base: a weight of shape {tuple(weight.shape)} cannot be stored in NF4 "
                          f"(needs a multiple of {NF4_BLOCK_SIZE} elements); set quantize_base=false")
    n_blocks = weight.numel() // NF4_BLOCK_SIZE
    try:
        with quiet_torchao_import():
            from torchao.quantization import to_nf4 as torchao_to_nf4
    except ImportError as err:
        raise MytuneError(f"quantize_base=true needs torchao (pip install torchao): {err}") from None
    return torchao_to_nf4(weight.contiguous(), NF4_BLOCK_SIZE, math.gcd(n_blocks, NF4_SCALER_BLOCK_SIZE))
