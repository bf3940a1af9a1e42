"""Parameters of the `full_dpo_distributed` recipe: the one schema for its YAML configs and `--override`s.

The preference loss and data fields and their meaning are those of `lora_dpo_single_device` / `lora_dpo_distributed`
(so a config moves between them by swapping the LoRA fields for the full fine-tune's); the model, optimisation,
memory, checkpoint, FSDP and tensor-parallel fields are those of `full_finetune_distributed`. `batch_size` is pairs
per data-parallel rank: the global batch of one optimizer step is batch_size * gradient_accumulation_steps * world
size / tensor_parallel_dim pairs (the ranks of one tensor-parallel group share their pairs).
"""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mytune.config.validation import (
    check_distributed_device, check_float8, check_preference_fields, check_tensor_parallel_fields,
    check_training_fields,
)


@dataclass
class FullDPODistributedParams:
    """Preference tuning (DPO, IPO, SimPO) of every weight of a decoder LLM, sharded with FSDP2 over the processes
    torchrun starts; the reference is a frozen, sharded copy of the starting weights (none for simpo)."""

    # Fields checked for existence before any heavy work (`mytune validate` reports them as warnings).
    INPUT_PATHS: ClassVar[tuple[str, ...]] = ("checkpoint_dir", "tokenizer_path", "dataset_path", "dataset_val")
    # Of those, the fields that may name a Hugging Face hub dataset (`owner/name`) instead of a local path.
    HUB_DATASET_FIELDS: ClassVar[tuple[str, ...]] = ("dataset_path", "dataset_val")

    # Model and checkpoint
    checkpoint_dir: str = ""  # Hugging Face model directory (config.json + *.safetensors) to tune: the policy's start and the reference
    hub_repo: str = ""  # the Hugging Face hub repo (owner/name) checkpoint_dir holds; `mytune download` fetches it
    model: str = ""  # named model builder (e.g. llama_tiny) for a seeded random start when checkpoint_dir is empty (the reference starts there too)
    tokenizer_path: str = ""  # tokenizer file or directory; empty means the tokenizer files in checkpoint_dir
    output_dir: str = "outputs/full_dpo_distributed"  # checkpoints and metrics.jsonl are written here

    # Preference loss (TRL's definitions: rewards are beta * (policy - reference) log-probs of each response)
    loss_type: Literal["dpo", "ipo", "simpo"] = "dpo"  # dpo: sigmoid (Rafailov et al.); ipo: squared, per-token log-ratios; simpo: reference-free, length-normalised, with margin simpo_gamma
    beta: float = 0.1  # strength of the pull to the reference (dpo, ipo: IPO's tau) or the reward scale (simpo)
    label_smoothing: float = 0.0  # dpo: assumed probability that a pair's preference is flipped (conservative DPO), in [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: target reward margin gamma (TRL's simpo_gamma; the loss uses gamma / beta)
    precompute_reference_logps: bool = False  # run the reference over the data once at setup and cache its log-probs next to the tokenized data (no reference copy held while training)

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
    max_eval_batches: int | None = None  # batches per validation on each process (null: the whole validation set)

    # Optimisation
    epochs: int = 1  # passes over the dataset
    max_steps_per_epoch: int | None = None  # stop an epoch after this many optimizer steps (null: whole epoch)
    batch_size: int = 2  # preference pairs per micro-batch on each process (one forward of 2 x batch_size rows: chosen, then rejected)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "sgd", "adamw8bit", "adamw4bit"] = "adamw"  # adamw8bit/adamw4bit: torchao low-bit state
    lr: float = 5e-7  # peak learning rate (full DPO wants a much smaller one than SFT)
    weight_decay: float = 0.0  # decoupled weight decay
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this (null: no clipping)

    # Memory and speed
    chunked_loss: bool = True  # output projection + log-probs loss_chunk_size tokens at a time (no full logits)
    loss_chunk_size: int = 1024  # tokens per chunk of the chunked log-probs
    activation_checkpointing: bool = False  # recompute each decoder layer of the policy in the backward (less memory, ~+33% compute)
    activation_offloading: bool = False  # keep the policy's saved activations in CPU memory until the backward (GPU runs)
    compile: bool = False  # torch.compile each decoder layer of the policy (CPU needs a C++ compiler)
    attention_backend: Literal["auto", "sdpa", "flex"] = "auto"  # sliding windows: auto = compiled flex_attention on CUDA where it helps, dense-mask SDPA elsewhere
    float8: bool = False  # float8 matmuls in the policy's decoder blocks (torchao; NVIDIA GPUs of compute capability 8.9+); the reference stays bf16

    # Checkpoints and resuming: output_dir/step_<N>/ holds the policy's HF files plus recipe_state.pt
    save_every_n_steps: int = 0  # optimizer steps between checkpoints (0: only after the last step)
    keep_last_n_checkpoints: int | None = None  # delete older step_<N> directories after each save (null: keep all)
    resume_from_checkpoint: str = ""  # "" = a fresh run; latest = the newest complete step_<N> of output_dir (fresh if none); or a step_<N> path; values set now beat the checkpoint's
    overwrite_output_dir: bool = False  # delete output_dir's step_<N> past this run's start (a fresh run refuses an output_dir holding any)

    # Precision, device, reproducibility, logging
    dtype: Literal["bf16", "fp32"] = "bf16"  # compute dtype; the policy's parameters (saved as such), gradients and AdamW state stay fp32 (sharded), the frozen reference is stored in bf16; log-probs and the loss are float32
    device: str = "auto"  # auto (cuda when available, else cpu), cpu or cuda; each rank uses cuda:LOCAL_RANK
    cpu_offload: bool = False  # keep sharded parameters (the reference's too), gradients and optimizer state in CPU memory (GPU runs)
    fsdp_reshard_after_forward: bool = True  # free each policy layer's gathered weights after its forward (less memory; false: no second all-gather in the backward)
    tensor_parallel_dim: int = 1  # tensor parallel: split each layer's matmuls (attention heads, MLP) over this many processes (a divisor of the world size, within a node); FSDP shards over the world size / tensor_parallel_dim groups
    sequence_parallel: bool = False  # with tensor_parallel_dim > 1: also split the norms' and residuals' activations along the sequence (less activation memory; batches padded to a multiple of tensor_parallel_dim)
    seed: int = 0  # seeds model init, data order and dropout
    log_every_n_steps: int = 1  # optimizer steps between metrics lines
    metric_loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl (output_dir/metrics.jsonl), stdout, tensorboard, wandb
    profile: bool = False  # PyTorch profiler trace of a few steps in output_dir/profile/
    profile_steps: int = 3  # optimizer steps recorded by the profiler (after 1 skipped and 1 warm-up step)

    def __post_init__(self) -> None:
        check_training_fields(self)
        check_distributed_device(self)
        check_float8(self)
        check_preference_fields(self)
        check_tensor_parallel_fields(self)
