"""Parameters of the `knowledge_distillation_distributed` recipe: the one schema for its YAML configs and `--override`s.

The fields and their meaning are those of `knowledge_distillation_single_device` (so a config moves between the two by
changing its device and sizes), plus `cpu_offload`, `fsdp_reshard_after_forward`, `tensor_parallel_dim` and
`sequence_parallel` as in `full_finetune_distributed`. `batch_size` is per data-parallel rank: the global batch of one
optimizer step is batch_size * gradient_accumulation_steps * world size / tensor_parallel_dim (the ranks of one
tensor-parallel group share their batch).
"""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mytune.config.validation import (
    check_data_fields,
    check_distillation_fields,
    check_distributed_device,
    check_tensor_parallel_fields,
    check_training_fields,
)
from mytune.errors import ConfigError


@dataclass
class KnowledgeDistillationDistributedParams:
    """Distil a frozen teacher LLM into a student (full or LoRA), both sharded with FSDP2 over the processes torchrun starts."""

    # Fields checked for existence before any heavy work (`mytune validate` reports them as warnings).
    INPUT_PATHS: ClassVar[tuple[str, ...]] = ("checkpoint_dir", "teacher_checkpoint_dir", "tokenizer_path", "dataset_path",
                                              "dataset_val")
    # Of those, the fields that may name a Hugging Face hub dataset (`owner/name`) instead of a local path.
    HUB_DATASET_FIELDS: ClassVar[tuple[str, ...]] = ("dataset_path", "dataset_val")

    # Student model and checkpoint
    checkpoint_dir: str = ""  # Hugging Face model directory (config.json + *.safetensors) of the student
    hub_repo: str = ""  # the Hugging Face hub repo (owner/name) checkpoint_dir holds; `mytune download` fetches it
    model: str = ""  # named model builder (e.g. llama_tiny) for a seeded random start when checkpoint_dir is empty
    tokenizer_path: str = ""  # tokenizer file or directory; empty means the tokenizer files in checkpoint_dir
    output_dir: str = "outputs/knowledge_distillation_distributed"  # checkpoints and metrics.jsonl are written here

    # Teacher and loss: loss = (1 - kd_ratio) * CE + kd_ratio * KL(teacher || student), over the response tokens
    teacher_checkpoint_dir: str = ""  # Hugging Face model directory of the frozen teacher (same tokenizer as the student)
    teacher_model: str = ""  # named model builder for a seeded random teacher when teacher_checkpoint_dir is empty (demo and tests)
    teacher_dtype: Literal["bf16", "fp32"] = "bf16"  # the teacher's weights and compute dtype
    teacher_quantize: bool = False  # keep the teacher's decoder-layer linear weights in NF4 (torchao, as QLoRA): ~1/4 of bf16 memory; needs 2+ processes
    kd_ratio: float = 0.5  # the KL's share of the loss (0: plain SFT, 1: distillation only)

    # Student LoRA: empty lora_target_modules = the student is fine-tuned in full
    lora_target_modules: list[str] = field(default_factory=list)  # layers that get adapters: q/k/v/o_proj, gate/up/down_proj, lm_head; or linear_qkv, linear_proj, linear_fc1, linear_fc2, output; empty = full fine-tune
    lora_rank: int = 8  # rank r of each adapter update B @ A
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input while training
    use_dora: bool = False  # DoRA: also learn a per-output magnitude over the normalised combined weight
    quantize_base: bool = False  # QLoRA: keep the frozen base weights of the targeted layers in NF4 (torchao)

    # Data (see mytune.data): formats instruct / chat / text, prompt formats, truncation, packing, tokenization cache
    dataset_path: str | list[str] = ""  # training data: a .jsonl/.json/.csv/.txt/.parquet file, a folder of them, or a hub dataset owner/name; a list [a.jsonl, owner/name, dir/] mixes several
    dataset_weights: list[float] = field(default_factory=list)  # sampling weight of each dataset_path source, e.g. [0.7, 0.3]; empty = by size (concatenation)
    dataset_formats: list[str] = field(default_factory=list)  # per-source dataset_format when sources differ, e.g. [instruct, chat]; empty = dataset_format for all
    column_maps: list[dict[str, str]] = field(default_factory=list)  # per-source column_map when sources differ, e.g. [{output: answer}, {}]; empty = column_map for all
    dataset_format: Literal["auto", "instruct", "chat", "text"] = "auto"  # row format; auto: from the columns (instruction, messages/conversations, text)
    column_map: dict[str, str] = field(default_factory=dict)  # our column -> the dataset's, e.g. {instruction: prompt, output: response}
    row_transform: str = ""  # module:function that turns each raw row into an instruct, chat or text row (e.g. my_pkg.rows:to_chat); empty = none
    chat_template: str = ""  # prompt format: alpaca, llama2, llama3, chatml, tokenizer or Jinja; empty = the tokenizer's, else alpaca/chatml
    train_on_input: bool = False  # also train on prompt tokens (by default only outputs / assistant turns are trained)
    max_seq_len: int = 2048  # tokens per sample (and per packed row); longer samples are truncated or dropped
    truncation: Literal["truncate", "drop"] = "truncate"  # samples over max_seq_len: cut (keeping the final eos) or left out; counted
    packed: bool = False  # pack several samples into each row of max_seq_len tokens (attention stays inside each sample)
    skip_bad_rows: bool = False  # skip and count unusable rows instead of stopping at the first one (named by file and line)
    dataset_cache_dir: str = ""  # tokenization cache; empty = $MYTUNE_DATA_CACHE or ~/.cache/mytune/datasets, off = no cache
    shuffle: bool = True  # reshuffle the dataset every epoch (seeded, the same order on every rank)

    # Validation: val_loss (the same mix of CE and KL), val_ce_loss, val_kd_loss and val_perplexity in metrics.jsonl
    dataset_val: str = ""  # validation data (a file, folder or hub name like dataset_path); empty = none or val_fraction
    val_fraction: float = 0.0  # hold out this fraction of dataset_path's samples for validation (0 = none)
    eval_every_n_steps: int = 0  # optimizer steps between validations; the last step is always evaluated (0 = only the last)
    max_eval_batches: int | None = None  # batches per validation (null: the whole validation set)

    # Optimisation
    epochs: int = 1  # passes over the dataset
    max_steps_per_epoch: int | None = None  # stop an epoch after this many optimizer steps (null: whole epoch)
    batch_size: int = 2  # samples per micro-batch on each process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "sgd", "adamw8bit", "adamw4bit"] = "adamw"  # adamw8bit/adamw4bit: torchao low-bit state
    lr: float = 2e-5  # peak learning rate (every weight, or the adapters with LoRA)
    weight_decay: float = 0.0  # decoupled weight decay
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup
    max_grad_norm: float | None = 1.0  # clip the trained weights' global gradient norm to this (null: no clipping)

    # Memory and speed
    chunked_loss: bool = True  # both heads + CE + KL loss_chunk_size tokens at a time (no full logits of either model); unchunked when lm_head is a LoRA target
    loss_chunk_size: int = 1024  # tokens per chunk of the chunked loss
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward (less memory, ~+33% compute)
    activation_offloading: bool = False  # keep saved activations in CPU memory until the backward (GPU runs)
    compile: bool = False  # torch.compile each decoder layer (CPU needs a C++ compiler)
    attention_backend: Literal["auto", "sdpa", "flex"] = "auto"  # packed rows / sliding windows: auto = compiled flex_attention on CUDA, dense-mask SDPA elsewhere

    # Checkpoints and resuming: output_dir/step_<N>/ holds the student's HF files (merged with LoRA, plus adapter/) and recipe_state.pt
    save_every_n_steps: int = 0  # optimizer steps between checkpoints (0: only after the last step)
    keep_last_n_checkpoints: int | None = None  # delete older step_<N> directories after each save (null: keep all)
    resume_from_checkpoint: str = ""  # "" = a fresh run; latest = the newest complete step_<N> of output_dir (fresh if none); or a step_<N> path; values set now beat the checkpoint's
    overwrite_output_dir: bool = False  # delete output_dir's step_<N> past this run's start (a fresh run refuses an output_dir holding any)

    # Precision, device, reproducibility, logging
    dtype: Literal["bf16", "fp32"] = "bf16"  # the student's compute dtype; its parameters (saved as such), gradients and AdamW state stay fp32 (sharded); a LoRA student's frozen base is stored in bf16
    device: str = "auto"  # auto (cuda when available, else cpu), cpu or cuda; each rank uses cuda:LOCAL_RANK
    cpu_offload: bool = False  # keep sharded parameters (student and teacher), gradients and optimizer state in CPU memory (GPU runs)
    fsdp_reshard_after_forward: bool = True  # free each student layer's gathered weights after its forward (less memory; false: no second all-gather in the backward)
    tensor_parallel_dim: int = 1  # tensor parallel: split each layer's matmuls (attention heads, MLP) of the student and the teacher over this many processes (a divisor of the world size, within a node); FSDP shards over the world size / tensor_parallel_dim groups
    sequence_parallel: bool = False  # with tensor_parallel_dim > 1: also split the norms' and residuals' activations along the sequence (less activation memory; batches padded to a multiple of tensor_parallel_dim)
    seed: int = 0  # seeds model init (a random teacher: seed + 1), adapter init, data order and dropout
    log_every_n_steps: int = 1  # optimizer steps between metrics lines
    metric_loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl (output_dir/metrics.jsonl), stdout, tensorboard, wandb
    profile: bool = False  # PyTorch profiler trace of a few steps in output_dir/profile/
    profile_steps: int = 3  # optimizer steps recorded by the profiler (after 1 skipped and 1 warm-up step)

    def __post_init__(self) -> None:
        check_training_fields(self)
        check_distillation_fields(self)
        check_distributed_device(self)
        check_data_fields(self)
        check_tensor_parallel_fields(self)
        if self.teacher_quantize and self.tensor_parallel_dim > 1:
            raise ConfigError(f"teacher_quantize=true (an NF4 teacher) is not supported with tensor_parallel_dim="
                              f"{self.tensor_parallel_dim} (NF4 blocks cannot be split column-wise): set "
                              f"teacher_quantize=false or tensor_parallel_dim=1")
