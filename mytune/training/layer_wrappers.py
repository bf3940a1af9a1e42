"""Memory and speed options applied to a built `TransformerDecoder`: activation checkpointing, activation offloading,
per-layer `torch.compile`.

None of them changes the module tree, so parameter names, `state_dict()` keys (HF's), FSDP sharding, LoRA key
matching and checkpoint files are the same with or without them. Order in a recipe, after the model is built and
before the optimizer: `apply_activation_checkpointing` -> `compile_layers` -> (`distributed.shard_model`);
`activation_offloading` wraps the forward pass of each micro-batch in the training loop.
"""

import contextlib
import sys
import types
from collections.abc import Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from mytune.models.transformer import TransformerDecoder

_INNER_FORWARD = "_mytune_inner_forward"


def apply_activation_checkpointing(model: TransformerDecoder, every_n_layers: int = 1) -> int:
    """Recompute each decoder layer's activations in the backward instead of keeping them; returns layers wrapped.

    Why: without it a step keeps every intermediate of every layer (attention projections, MLP's 3.5x-wide hidden
    states...) until the backward; with it only each layer's input is kept and the layer's forward runs a second time
    during the backward (~+33% compute for a large cut in activation memory). `every_n_layers=2` checkpoints every
    other layer, trading some of the memory back for speed.

    Each chosen layer's `forward` becomes a non-reentrant `torch.utils.checkpoint` of its original forward, set on
    the instance: unlike `checkpoint_wrapper` no `_checkpoint_wrapped_module` level is inserted, so parameter names
    and state-dict keys are unchanged. RNG state is preserved, so dropout (LoRA) draws the same mask when recomputed.
    Calling it twice does not wrap a layer twice.
    """
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers must be positive, got {every_n_layers}")
    wrapped = 0
    for idx, layer in enumerate(model.model.layers):
        if idx % every_n_layers or hasattr(layer, _INNER_FORWARD):
            continue
        # Bound methods (not closures) in the instance dict, so copy.deepcopy(model) rebinds them to the copy.
        setattr(layer, _INNER_FORWARD, layer.forward)
        layer.forward = types.MethodType(_checkpointed_forward, layer)
        wrapped += 1
    return wrapped


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(getattr(self, _INNER_FORWARD), *args, use_reentrant=False, **kwargs)


def compile_layers(model: TransformerDecoder, **compile_kwargs) -> TransformerDecoder:
    """`torch.compile` each decoder layer in place (`nn.Module.compile`); returns `model`.

    Why per layer: all layers share one compiled graph (same code, same shapes), so compile time is that of one
    layer rather than of the whole model, and FSDP's per-layer hooks stay outside the graphs. In place, so names and
    state-dict keys do not gain `_orig_mod.`. Call after `apply_activation_checkpointing` (the checkpoint is then
    traced into the graph) and before `shard_model`. `compile_kwargs` go to `torch.compile` (e.g. `mode=...`);
    varying sequence lengths recompile once and then run with dynamic shapes.
    """
    for layer in model.model.layers:
        layer.compile(**compile_kwargs)
    return model


class ActivationOffloader:
    """Saved-tensor hooks that keep activations in CPU memory between a layer's forward and its backward.

    Why not plain `torch.autograd.graph.save_on_cpu`: that copies *every* saved tensor, including the weights each
    matmul saves for its backward, so each step would copy the whole model to the CPU and back. Here parameters (and
    views of them), tensors already on the CPU and tensors under `min_bytes` stay where they are; the others are
    copied to (pinned, on CUDA) CPU memory in the forward and back to their device when the backward needs them.

    On CUDA the copies run on a side stream of their own: the device-to-host copy waits only for the tensor to be
    computed and then overlaps the rest of the forward; `record_stream` keeps the tensor's memory from being reused
    before its copy is done. The copy back is queued on the same side stream (after the copy out, in stream order)
    and the compute stream waits for it with an event.

    `offloaded_tensors` / `offloaded_bytes` count what was moved. `offload_cpu_tensors=True` copies CPU tensors too:
    useless for training, it only lets a CPU-only machine exercise the copy path.
    """

    def __init__(self, *, min_bytes: int = 1024, pin_memory: bool | None = None, offload_cpu_tensors: bool = False):
        self.min_bytes = min_bytes
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.offload_cpu_tensors = offload_cpu_tensors
        self.offloaded_tensors = 0
        self.offloaded_bytes = 0

    def should_offload(self, tensor: torch.Tensor) -> bool:
        if tensor.layout != torch.strided or (tensor.device.type == "cpu" and not self.offload_cpu_tensors):
            return False
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
            return False
        return tensor.numel() * tensor.element_size() >= self.min_bytes

    def pack(self, tensor: torch.Tensor):
        if not self.should_offload(tensor):
            return tensor
        cpu_copy = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=self.pin_memory)
        if tensor.device.type == "cuda":
            stream = _copy_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor has been computed
            with torch.cuda.stream(stream):
                cpu_copy.copy_(tensor, non_blocking=self.pin_memory)
            tensor.record_stream(stream)  # its memory is not reused before the copy is done
        else:
            cpu_copy.copy_(tensor)
        self.offloaded_tensors += 1
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return tensor.device, cpu_copy

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, cpu_copy = packed
        if device.type != "cuda":
            return cpu_copy.to(device)
        stream, compute = _copy_stream(device), torch.cuda.current_stream(device)
        with torch.cuda.stream(stream):  # after this tensor's copy out, in stream order
            tensor = cpu_copy.to(device, non_blocking=self.pin_memory)
        compute.wait_stream(stream)
        tensor.record_stream(compute)  # allocated on the side stream, used (and freed) on the compute stream
        return tensor


_COPY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per CUDA device for the offloading copies, made on first use."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def use_activation_offloading(requested: bool, device: torch.device) -> bool:
    """Whether to offload: `requested` on a CUDA device. Elsewhere (device=auto on a machine without a GPU) it would
    only copy CPU tensors to the CPU, so say so once and run without it."""
    if requested and device.type != "cuda":
        print(f"mytune: activation_offloading=true has no effect on {device.type} (it moves activations from GPU to "
              f"CPU memory): running without it", file=sys.stderr, flush=True)
        return False
    return requested


@contextlib.contextmanager
def activation_offloading(enabled: bool, **offloader_kwargs) -> Iterator[ActivationOffloader | None]:
    """Context for the forward pass: saved activations go to CPU memory (see `ActivationOffloader`); a no-op when
    not `enabled`. Yields the offloader (None when disabled). Only the forward needs to be inside; the backward
    brings the tensors back wherever it runs. Combined with activation checkpointing, what is left to offload is
    each layer's input plus the tensors saved outside the layers (embedding, final norm, loss).
    """
    if not enabled:
        yield None
        return
    offloader = ActivationOffloader(**offloader_kwargs)
    with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
        yield offloader
