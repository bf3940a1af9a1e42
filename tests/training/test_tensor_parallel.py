"""Tensor parallelism (`mytune.training.tensor_parallel`) on 2 CPU processes (gloo) equals one device.

For each variant (a Llama-like GQA model, Qwen2's qkv bias, Qwen3's q/k norms with tied embeddings, LoRA and DoRA
on every linear of the layers; each with and without sequence parallel) the workers build the model the way a recipe
does (meta device -> `apply_lora` -> `apply_tensor_parallel` -> `distributed.load_full_state_dict` from rank 0's seeded
model) and rank 0 also runs the same seeded model on its own. Checked, float32, within 1e-5:
- the forward logits and the loss (the chunked loss the recipes use, on the replicated head);
- every trainable parameter's gradient (gathered whole with `full_tensor()`) and the gradient norm (`clip_grad_norm_`);
- the losses of a few clipped AdamW steps, and the weights gathered for saving (`distributed.gather_full_state_dict`);
  two variants run their TP model under activation checkpointing (the collectives recomputed in the backward).
A save at tp=2 resumed at tp=1 (FSDP over the 2 ranks) continues with the single-device losses; 4 processes at
(dp=2, tp=2), FSDP2 over dp, equal one device too. The one-line errors: a tp that does not divide heads / kv heads /
the MLP or the world size, QLoRA, a sequence that sequence parallel cannot cut.

The workers are this file run as a script (`python test_tensor_parallel.py RANK WORLD OUT_DIR`), every variant in one
launch (most of the time is the start-up of the processes).
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # as a worker script
    sys.path.insert(0, str(REPO))

from mytune.errors import MytuneError  # noqa: E402
from mytune.models import ModelArgs, TransformerDecoder  # noqa: E402
from mytune.modules.lora import apply_lora, trainable_parameters  # noqa: E402
from mytune.training.loss import chunked_cross_entropy_sum, count_label_tokens  # noqa: E402

TP = 2
BATCH, SEQ_LEN, STEPS, LR, MAX_GRAD_NORM = 2, 16, 3, 3e-3, 0.5
RESUMED_STEPS = 2  # after STEPS at tp=2, saved and resumed at tp=1 (FSDP over the 2 ranks)
RESUMED = ["llama", "lora_llama_bias_sp"]
TOL = 1e-5
# The weights after the AdamW steps: Adam scales each coordinate by its own gradient RMS, so a coordinate whose
# gradient is tiny turns the gradient's ~1e-7 rounding into a relative one, and its step into up to a fraction of LR.
WEIGHTS_TOL = 2e-2 * LR
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA = ModelArgs(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
QWEN2 = dataclasses.replace(LLAMA, model_type="qwen2", attention_bias=True, max_window_layers=2)
QWEN3 = dataclasses.replace(LLAMA, model_type="qwen3", qk_norm=True, tie_word_embeddings=True, max_window_layers=2)
LLAMA_O_BIAS = dataclasses.replace(LLAMA, attention_bias=True)  # q/k/v and o_proj biases: a row-wise bias too
# name -> (model args, adapters on TARGETS (None, "lora", "dora"), sequence parallel)
VARIANTS = {
    "llama": (LLAMA, None, False), "llama_sp": (LLAMA, None, True),
    "qwen2": (QWEN2, None, False), "qwen2_sp": (QWEN2, None, True),
    "qwen3": (QWEN3, None, False), "qwen3_sp": (QWEN3, None, True),
    "lora_llama_bias": (LLAMA_O_BIAS, "lora", False), "lora_llama_bias_sp": (LLAMA_O_BIAS, "lora", True),
    "lora_qwen3_sp": (QWEN3, "lora", True), "dora_llama_bias_sp": (LLAMA_O_BIAS, "dora", True),
}
CHECKPOINTED = ["lora_qwen3_sp", "qwen2_sp"]  # TP under activation checkpointing too (collectives recomputed)
VARIANTS_2D = ["llama", "qwen3_sp", "lora_llama_bias_sp"]  # (dp=2, tp=2) with FSDP2 over dp: 4 processes


def seeded_model(args: ModelArgs, adapter: str | None) -> TransformerDecoder:
    """The seeded model every run starts from; every parameter (biases, norms, LoRA B too) perturbed off its init
    so that no gradient is trivially zero or symmetric."""
    torch.manual_seed(0)
    model = TransformerDecoder(args)
    if adapter:
        apply_lora(model, TARGETS, rank=4, alpha=8.0, use_dora=adapter == "dora")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def meta_model(args: ModelArgs, adapter: str | None) -> TransformerDecoder:
    with torch.device("meta"):
        model = TransformerDecoder(args)
    if adapter:
        apply_lora(model, TARGETS, rank=4, alpha=8.0, use_dora=adapter == "dora")
    return model


def batch(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, args.vocab_size, (BATCH, SEQ_LEN), generator=generator)
    labels = tokens.clone()
    labels[:, :3] = -100
    labels[1, :7] = -100
    return tokens, labels


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def run(model: TransformerDecoder, tokens: torch.Tensor, labels: torch.Tensor, clip, *, num_label_tokens: int,
        steps: int = STEPS, dp_size: int = 1, all_reduce=lambda x: x, optimizer=None, logits: bool = True) -> dict:
    """Logits, then `steps` AdamW steps on the chunked loss (the recipes' path) of this dp rank's part of the batch,
    normalised by the label tokens of the whole batch, gradients clipped by `clip`: the global losses (and the one
    after the last step), the first step's gradients (whole, before clipping) and gradient norm."""
    # Before any forward: FSDP's root keeps its gathered parameters registered from a forward to the backward, so
    # model.parameters() after a forward would hand the optimizer those rather than the shards.
    optimizer = optimizer or torch.optim.AdamW(trainable_parameters(model), lr=LR)
    result = {"optimizer": optimizer}
    if logits:
        with torch.no_grad():
            result["logits"] = model(tokens).detach().clone()
    losses, grads, grad_norm = [], None, None
    for step in range(steps + 1):
        hidden = model(tokens, return_hidden=True)
        loss = chunked_cross_entropy_sum(hidden, model.lm_head.weight, labels, chunk_size=8) / num_label_tokens
        losses.append(float(all_reduce(loss.detach())))
        if step == steps:
            break
        (loss * dp_size).backward()  # FSDP averages over the dp ranks: scaled back to the sum
        if grads is None:
            grads = {name: full(p.grad).clone() for name, p in model.named_parameters() if p.requires_grad}
        norm = float(clip(model.parameters(), MAX_GRAD_NORM))
        grad_norm = norm if grad_norm is None else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {**result, "losses": losses, "grads": grads, "grad_norm": grad_norm}


def worker(rank: int, world_size: int, out_dir: Path) -> None:
    """One rank, every variant of this world size: results to out_dir/<variant>_rank<N>.pt."""
    import torch.distributed as dist

    from mytune.training.tensor_parallel import make_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'store'}", rank=rank, world_size=world_size)
    try:
        mesh = make_device_mesh(world_size, TP, "cpu")
        for variant in VARIANTS if world_size == TP else VARIANTS_2D:
            torch.save(run_variant(rank, mesh, variant, out_dir), out_dir / f"{variant}_rank{rank}.pt")
        if world_size == TP:
            torch.save(error_lines(mesh), out_dir / f"errors_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_variant(rank: int, mesh, variant: str, out_dir: Path) -> dict:
    """The recipe's path on `mesh` ((dp, tp) or tp alone): meta model, LoRA, TP, FSDP over dp, load from rank 0,
    train, gather for saving; rank 0 also runs the single-device reference on the whole batch."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from mytune.training import distributed
    from mytune.training.layer_wrappers import apply_activation_checkpointing
    from mytune.training.tensor_parallel import apply_tensor_parallel, clip_grad_norm_, mesh_dim

    args, adapter, sequence_parallel = VARIANTS[variant]
    tokens, labels = batch(args)
    num_label_tokens = count_label_tokens(labels)
    result = {}
    if rank == 0:  # the single-device reference
        reference = seeded_model(args, adapter)
        result["reference_loaded"] = {k: v.clone() for k, v in reference.state_dict().items()}
        result["reference"] = run(reference, tokens, labels, torch.nn.utils.clip_grad_norm_,
                                  num_label_tokens=num_label_tokens)
        result["reference_state"] = {k: v.clone() for k, v in reference.state_dict().items()}
        more = run(reference, tokens, labels, torch.nn.utils.clip_grad_norm_, num_label_tokens=num_label_tokens,
                   steps=RESUMED_STEPS, optimizer=result["reference"].pop("optimizer"), logits=False)
        result["reference_resumed_losses"] = more["losses"]
    tp_mesh, dp_mesh = mesh_dim(mesh, "tp"), mesh_dim(mesh, "dp")
    model = apply_tensor_parallel(meta_model(args, adapter), tp_mesh, sequence_parallel=sequence_parallel)
    if variant in CHECKPOINTED:
        apply_activation_checkpointing(model)
    dp_size, dp_rank, all_reduce = 1, 0, lambda x: x
    if dp_mesh is not None:  # what distributed.shard_model does, over the dp ranks only
        for layer in model.model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        dp_size, dp_rank = dp_mesh.size(), dp_mesh.get_local_rank()

        def all_reduce(value: torch.Tensor) -> torch.Tensor:
            value = value.clone()
            dist.all_reduce(value, group=dp_mesh.get_group())
            return value
    distributed.load_full_state_dict(model, seeded_model(args, adapter).state_dict() if rank == 0 else None,
                                     torch.device("cpu"))
    if args.tie_word_embeddings and dp_mesh is None:  # to_empty unties plain parameters (FSDP's are DTensors)
        model.tie_weights()
    loaded = distributed.gather_full_state_dict(model)  # replicated weights come back as the parameters themselves
    result["tp_loaded"] = {k: v.clone() for k, v in loaded.items()} if loaded is not None else None
    mine = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)  # the tp ranks share a batch
    result["tp"] = run(model, tokens[mine], labels[mine], clip_grad_norm_, num_label_tokens=num_label_tokens,
                       dp_size=dp_size, all_reduce=all_reduce)
    result["tp_state"] = distributed.gather_full_state_dict(model)
    result["rows"] = (mine.start, mine.stop)  # this rank's rows of the batch (its logits)
    optimizer = result["tp"].pop("optimizer")
    if variant in RESUMED and dp_mesh is None:
        result["resumed_losses"] = resume_at_tp1(rank, variant, optimizer, model, result["tp_state"],
                                                 out_dir / f"{variant}_step_{STEPS}")
    return result


def resume_at_tp1(rank: int, variant: str, optimizer, tp_model: TransformerDecoder, full_state,
                  checkpoint_dir: Path) -> list[float]:
    """Save the tp=2 run as a recipe does (the gathered weights, `save_recipe_state`'s full optimizer state), then
    resume it at tp=1 as `full_finetune_distributed` would (FSDP over both ranks) for RESUMED_STEPS steps."""
    import torch.distributed as dist

    from mytune.training import distributed
    from mytune.training.recipe_state import load_recipe_state, save_recipe_state
    from mytune.training.tensor_parallel import clip_grad_norm_

    args, adapter, _ = VARIANTS[variant]
    save_recipe_state(checkpoint_dir, optimizer=optimizer, lr_scheduler=None, dataloader_state=None, global_step=STEPS,
                      epoch=0, model=tp_model)
    model = meta_model(args, adapter)
    distributed.shard_model(model, bf16=False, cpu_offload=False)
    distributed.load_full_state_dict(model, full_state, torch.device("cpu"))
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=LR)
    load_recipe_state(checkpoint_dir, optimizer=optimizer, lr_scheduler=None, model=model, restore_rng=False)
    tokens, labels = batch(args)
    mine = slice(rank, rank + 1)  # dp=2: one row each

    def all_reduce(value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value)
        return value

    return run(model, tokens[mine], labels[mine], clip_grad_norm_, num_label_tokens=count_label_tokens(labels),
               steps=RESUMED_STEPS, dp_size=2, all_reduce=all_reduce, optimizer=optimizer, logits=False)["losses"]


def error_lines(mesh) -> dict[str, str]:
    """The one-line errors that need a process group (a tp mesh)."""
    from mytune.training.tensor_parallel import apply_tensor_parallel
    lines = {}
    for name, build in {
        "qlora": lambda: apply_lora(meta_model(LLAMA, None), TARGETS, rank=4, alpha=8.0, quantize_base=True),
        "kv_heads": lambda: meta_model(dataclasses.replace(LLAMA, num_key_value_heads=1), None),
    }.items():
        try:
            apply_tensor_parallel(build(), mesh)
        except MytuneError as err:
            lines[name] = str(err)
    model = apply_tensor_parallel(seeded_model(LLAMA, None), mesh, sequence_parallel=True)
    try:
        model(torch.zeros(1, SEQ_LEN + 1, dtype=torch.long))
    except MytuneError as err:
        lines["sequence"] = str(err)
    return lines


def launch(out_dir: Path, world_size: int) -> Path:
    """Run the workers of one world size; the directory of their results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([sys.executable, __file__, str(rank), str(world_size), str(out_dir)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for rank in range(world_size)]
    for proc in workers:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-4000:]
    return out_dir


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> Path:
    """Every variant at tp=2 on 2 ranks."""
    return launch(tmp_path_factory.mktemp("tp"), TP)


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory) -> Path:
    """VARIANTS_2D at (dp=2, tp=2) on 4 ranks."""
    return launch(tmp_path_factory.mktemp("dp_tp"), 2 * TP)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def check_equals_one_device(out_dir: Path, variant: str, world_size: int) -> None:
    args, adapter, _ = VARIANTS[variant]
    ranks = [torch.load(out_dir / f"{variant}_rank{rank}.pt", weights_only=False) for rank in range(world_size)]
    reference = ranks[0]["reference"]
    if adapter != "dora":  # the steps clip, scaling every kind of gradient (DoRA's norm, ~0.27, stays below)
        assert reference["grad_norm"] > MAX_GRAD_NORM
    for result in ranks:
        tp, rows = result["tp"], slice(*result["rows"])
        assert (tp["logits"] - reference["logits"][rows]).abs().max() < TOL
        assert max(abs(a - b) for a, b in zip(tp["losses"], reference["losses"])) < TOL
        assert max_diff(tp["grads"], reference["grads"]) < TOL
        assert abs(tp["grad_norm"] - reference["grad_norm"]) < TOL
    if adapter:  # only the adapters train, and each has its gradient (DoRA: its magnitude too)
        names = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if adapter == "dora" else ())
        assert len(reference["grads"]) == len(names) * len(TARGETS) * args.num_hidden_layers
        assert all(name.endswith(names) for name in reference["grads"])
    # What a save writes: the loaded weights bit for bit, and the weights after the steps.
    assert max_diff(ranks[0]["tp_loaded"], ranks[0]["reference_loaded"]) == 0
    assert max_diff(ranks[0]["tp_state"], ranks[0]["reference_state"]) < WEIGHTS_TOL
    assert all(result["tp_state"] is None for result in ranks[1:])
    if world_size == TP and variant in RESUMED:  # saved at tp=2, resumed at tp=1: the same next losses
        for result in ranks:
            assert max(abs(a - b) for a, b in zip(result["resumed_losses"], ranks[0]["reference_resumed_losses"])) < TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_equals_one_device(two_rank_results, variant):
    check_equals_one_device(two_rank_results, variant, TP)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS_2D)
def test_fsdp_dp2_x_tp2_equals_one_device(four_rank_results, variant):
    check_equals_one_device(four_rank_results, variant, 2 * TP)


def test_tp_refusals_are_one_line(two_rank_results):
    lines = torch.load(two_rank_results / "errors_rank0.pt")
    assert "quantize_base" in lines["qlora"]
    assert "num_key_value_heads=1" in lines["kv_heads"]
    assert "sequence length (17)" in lines["sequence"]
    assert all("\n" not in line for line in lines.values())


def test_tensor_parallel_dim_must_divide_the_model_and_the_world():
    from mytune.models import model_args
    from mytune.training.tensor_parallel import check_tensor_parallel, make_device_mesh

    check_tensor_parallel(model_args("llama3_1_70b"), 8)  # 64 heads, 8 kv heads, 28672
    with pytest.raises(MytuneError, match=r"num_key_value_heads=8; use one of \[1, 2, 4, 8\]"):
        check_tensor_parallel(model_args("llama3_1_8b"), 16)
    with pytest.raises(MytuneError, match="num_attention_heads=14"):
        check_tensor_parallel(model_args("qwen2_5_0_5b"), 4)
    with pytest.raises(MytuneError, match="intermediate_size=96"):
        check_tensor_parallel(dataclasses.replace(LLAMA, num_attention_heads=64, num_key_value_heads=64), 64)
    with pytest.raises(MytuneError, match=r"tensor_parallel_dim=3 must be a positive divisor of the number of "
                                          r"processes \(8\)"):
        make_device_mesh(8, 3, "cpu")


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
