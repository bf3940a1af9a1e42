"""Parameters of the `lora_dpo_distributed` recipe: the one schema for its YAML configs and `--override`s.

The fields and their meaning are those of `lora_dpo_single_device` (so a config moves between the two by changing
its device and sizes), plus `cpu_offload`, `fsdp_reshard_after_forward`, `tensor_parallel_dim` and
`sequence_parallel` as in `lora_finetune_distributed`. `batch_size` is per data-parallel rank: the global batch of one
optimizer step is batch_size * gradient_accumulation_steps * world size / tensor_parallel_dim pairs (the ranks of one
tensor-parallel group share their pairs).
"""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mytune.config.validation import (
    check_distributed_device, check_lora_fields, check_preference_fields, check_tensor_parallel_fields,
    check_training_fields,
)


@dataclass
class LoRADPODistributedParams:
    """Preference tuning (DPO, IPO, SimPO) of a decoder LLM with LoRA adapters, sharded with FSDP2 over the processes
    torchrun starts: the frozen base with the adapters turned off is the reference model (no second copy)."""

    # Fields checked for existence before any heavy work (`mytune validate` reports them as warnings).
    INPUT_PATHS: ClassVar[tuple[str, ...]] = ("checkpoint_dir", "tokenizer_path", "dataset_path", "dataset_val")
    # Of those, the fields that may name a Hugging Face hub dataset (`owner/name`) instead of a local path.
    HUB_DATASET_FIELDS: ClassVar[tuple[str, ...]] = ("dataset_path", "dataset_val")

    # Model and checkpoint
    checkpoint_dir: str = ""  # Hugging Face model directory (config.json + *.safetensors) to tune: the policy's start and the reference
    hub_repo: str = ""  # the Hugging Face hub repo (owner/name) checkpoint_dir holds; `mytune download` fetches it
    model: str = ""  # named model builder (e.g. llama_tiny) for a seeded random start when checkpoint_dir is empty
    tokenizer_path: str = ""  # tokenizer file or directory; empty means the tokenizer files in checkpoint_dir
    output_dir: str = "outputs/lora_dpo_distributed"  # checkpoints and metrics.jsonl are written here

    # LoRA
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # layers that get adapters: q/k/v/o_proj, gate/up/down_proj, lm_head; or linear_qkv, linear_proj, linear_fc1, linear_fc2, output
    lora_rank: int = 8  # rank r of each adapter update B @ A
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input while training
    use_dora: bool = False  # DoRA: also learn a per-output magnitude over the normalised combined weight
    quantize_base: bool = False  # QLoRA: keep the frozen base weights of the targeted layers in NF4 (torchao); sharded; 2+ processes; the reference is then the NF4 base

    # Preference loss (TRL's definitions: rewards are beta * (policy - reference) log-probs of each response)
    loss_type: Literal["dpo", "ipo", "simpo"] = "dpo"  # dpo: sigmoid (Rafailov et al.); ipo: squared, per-token log-ratios; simpo: reference-free, length-normalised, with margin simpo_gamma
    beta: float = 0.1  # strength of the pull to the reference (dpo, ipo: IPO's tau) or the reward scale (simpo)
    label_smoothing: float = 0.0  # dpo, simpo: assumed probability that a pair's preference is flipped (conservative DPO), in [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: target reward margin gamma (TRL's simpo_gamma; the loss uses gamma / beta)
    precompute_reference_logps: bool = False  # run the reference over the data once at setup and cache its log-probs next to the tokenized data (one forward per pair per step instead of two)

    # Data (see mytune.data.preference): prompt/chosen/rejected rows as strings or message lists, or chosen/rejected conversations sharing a prefix
    dataset_path: str = ""  # preference pairs: a .jsonl/.json/.csv/.parquet file, a folder of them, or a hub dataset owner/name
    column_map: dict[str, str] = field(default_factory=dict)  # our column -> the dataset's, e.g. {prompt: question, chosen: good, rejected: bad}
    chat_template: str = ""  # prompt format: alpaca, llama2, llama3, chatml, tokenizer or Jinja; empty = the tokenizer's, else alpaca/chatml
    max_seq_len: int = 2048  # tokens per response with its prompt (chosen and rejected each); longer pairs are truncated or dropped
    truncation: Literal["truncate", "drop"] = "truncate"  # pairs over max_seq_len: cut the prompt's start (then the response's end, keeping eos) or leave the pair out; counted
    skip_bad_rows: bool = False  # skip and count unusable rows instead of stopping at the first one (named by file and line)
    dataset_cache_dir: str = ""  # tokenization (and reference log-prob) cache; empty = $MYTUNE_DATA_CACHE or ~/.cache/mytune/datasets, off = no cache
    shuffle: bool = True  # reshuffle the dataset every epoch (seeded, the same order on every rank)

    # Validation: val_loss and val_rewards/* (accuracies, margins, ...) on held-out pairs in metrics.jsonl
    dataset_val: str = ""  # validation pairs (a file, folder or hub name like dataset_path); empty = none or val_fraction
    val_fraction: float = 0.0  # hold out this fraction of dataset_path's pairs for validation (0 = none)
    eval_every_n_steps: int = 0  # optimizer steps between validations; the last step is always evaluated (0 = only the last)
    max_eval_batches: int | None = None  # batches per validation (null: the whole validation set)

    # Optimisation
    epochs: int = 1  # passes over the dataset
    max_steps_per_epoch: int | None = None  # stop an epoch after this many optimizer steps (null: whole epoch)
    batch_size: int = 2  # preference pairs per micro-batch on each process (one forward of 2 x batch_size rows: chosen, then rejected)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "sgd", "adamw8bit", "adamw4bit"] = "adamw"  # adamw8bit/adamw4bit: torchao low-bit state
    lr: float = 5e-5  # peak learning rate (adapters only)
    weight_decay: float = 0.0  # decoupled weight decay
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup
    max_grad_norm: float | None = 1.0  # clip the adapters' global gradient norm to this (null: no clipping)

    # Memory and speed
    chunked_loss: bool = True  # output projection + log-probs loss_chunk_size tokens at a time (no full logits); unchunked when lm_head is a LoRA target
    loss_chunk_size: int = 1024  # tokens per chunk of the chunked log-probs
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward (less memory, ~+33% compute)
    activation_offloading: bool = False  # keep saved activations in CPU memory until the backward (GPU runs)
    compile: bool = False  # torch.compile each decoder layer (CPU needs a C++ compiler)
    attention_backend: Literal["auto", "sdpa", "flex"] = "auto"  # sliding windows: auto = compiled flex_attention on CUDA where it helps, dense-mask SDPA elsewhere

    # Checkpoints and resuming: output_dir/step_<N>/ holds the merged HF files, adapter/ and recipe_state.pt
    save_every_n_steps: int = 0  # optimizer steps between checkpoints (0: only after the last step)
    keep_last_n_checkpoints: int | None = None  # delete older step_<N> directories after each save (null: keep all)
    resume_from_checkpoint: str = ""  # "" = a fresh run; latest = the newest complete step_<N> of output_dir (fresh if none); or a step_<N> path; values set now beat the checkpoint's
    overwrite_output_dir: bool = False  # delete output_dir's step_<N> past this run's start (a fresh run refuses an output_dir holding any)

    # Precision, device, reproducibility, logging
    dtype: Literal["bf16", "fp32"] = "bf16"  # compute, save and frozen-base dtype; adapters, their grads and AdamW state stay fp32; log-probs and the loss are float32
    device: str = "auto"  # auto (cuda when available, else cpu), cpu or cuda; each rank uses cuda:LOCAL_RANK
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in CPU memory (GPU runs)
    fsdp_reshard_after_forward: bool = True  # free each layer's gathered weights after its forward (less memory; false: no second all-gather in the backward)
    tensor_parallel_dim: int = 1  # tensor parallel: split each layer's matmuls (attention heads, MLP) over this many processes (a divisor of the world size, within a node); FSDP shards over the world size / tensor_parallel_dim groups
    sequence_parallel: bool = False  # with tensor_parallel_dim > 1: also split the norms' and residuals' activations along the sequence (less activation memory; batches padded to a multiple of tensor_parallel_dim)
    seed: int = 0  # seeds model init, adapter init, data order and dropout
    log_every_n_steps: int = 1  # optimizer steps between metrics lines
    metric_loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl (output_dir/metrics.jsonl), stdout, tensorboard, wandb
    profile: bool = False  # PyTorch profiler trace of a few steps in output_dir/profile/ (rank 0)
    profile_steps: int = 3  # optimizer steps recorded by the profiler (after 1 skipped and 1 warm-up step)

    def __post_init__(self) -> None:
        check_training_fields(self)
        check_lora_fields(self)
        check_distributed_device(self)
        check_preference_fields(self)
        check_tensor_parallel_fields(self)
