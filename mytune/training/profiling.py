"""Measuring a run: the PyTorch profiler around a few steps, peak memory, and model FLOPs per token (for MFU)."""

import contextlib
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from mytune.models.transformer import ModelArgs


class _NoProfiler:
    """Stands in for `torch.profiler.profile` when profiling is off, so the loop calls `.step()` unconditionally."""

    def step(self) -> None:
        pass


@contextlib.contextmanager
def maybe_profile(enabled: bool, output_dir: str | Path, wait: int = 1, warmup: int = 1,
                  active: int = 3) -> Iterator["torch.profiler.profile | _NoProfiler"]:
    """Profile optimizer steps `wait + warmup + 1` .. `wait + warmup + active` once; write a Chrome trace.

    Yields an object with `.step()`: call it after every optimizer step. The first `wait` steps are skipped, the
    next `warmup` run the profiler without recording (its start-up cost stays out of the trace), the next `active`
    are recorded, after which the trace goes to `output_dir/profile/rank<R>_step<N>.json` (open it in
    chrome://tracing or https://ui.perfetto.dev). CPU activity always, CUDA kernels when CUDA is available; shapes
    and memory are recorded too. Disabled, it yields a no-op with `.step()` and costs nothing.
    """
    if not enabled:
        yield _NoProfiler()
        return
    trace_dir = Path(output_dir) / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def write_trace(prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(str(trace_dir / f"rank{rank}_step{prof.step_num}.json"))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write_trace,
                                record_shapes=True, profile_memory=True) as prof:
        yield prof


def peak_memory_gib(device: torch.device | str) -> float:
    """Peak memory of this process in GiB (2**30 bytes) since it started.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only, not the caching allocator's reserve). CPU: the peak
    resident set size of the whole process (`ru_maxrss`; includes the Python interpreter and libraries, and cannot
    be reset).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return max_rss * bytes_per_unit / 2**30


def matmul_params(args: ModelArgs) -> int:
    """Parameters that take part in a matrix multiply per token: every linear weight (and bias) of the decoder
    layers plus the output head. The input embedding is a lookup (no FLOPs) and is left out, also when tied to the
    head, whose matmul is counted; RMSNorm weights are elementwise and left out."""
    hidden, heads, kv_heads, head_dim = args.hidden_size, args.num_attention_heads, args.kv_heads, args.attn_head_dim
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if args.attention_bias:
        attention += q + 2 * kv
    if args.o_proj_bias:
        attention += hidden
    mlp = 3 * hidden * args.intermediate_size
    return args.num_hidden_layers * (attention + mlp) + args.vocab_size * hidden


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token for sequences of `seq_len` tokens:

        6 * N  +  12 * L * H * Q * S

    N = `matmul_params(args)`: each parameter does a multiply-add (2 FLOPs) per token in the forward and twice that
    in the backward (gradients of inputs and of weights). The attention scores: per layer and token, QK^T and
    softmax(.)V are each 2 * H * Q * S FLOPs forward (H query heads of width Q against S positions), x3 for
    forward + backward. The causal mask is ignored (as in PaLM's MFU and torchtitan), so MFU figures compare with
    theirs. Activation recomputation (checkpointing) is not counted: MFU measures useful model FLOPs.

    MFU = tokens_per_s * flops_per_token / (the device's peak FLOP/s for the dtype).
    """
    attention = 12 * args.num_hidden_layers * args.num_attention_heads * args.attn_head_dim * seq_len
    return 6 * matmul_params(args) + attention
