"""Parameters of the `full_finetune_distributed` recipe: the one schema for its YAML configs and `--override`s.

The fields and their meaning are those of `full_finetune_single_device` (so a config moves between the two by
changing its device and sizes), plus `cpu_offload`. `batch_size` is per process: the global batch of one optimizer
step is batch_size * gradient_accumulation_steps * world size.
"""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mytune.errors import ConfigError

DATASET_COLUMNS = ("instruction", "input", "output", "messages", "conversations", "text")  # keys of column_map
CHAT_TEMPLATES = ("alpaca", "llama2", "llama3", "chatml", "tokenizer")


@dataclass
class FullFinetuneDistributedParams:
    """Full fine-tuning of every weight of a decoder LLM, sharded with FSDP2 over the processes torchrun starts."""

    # Fields checked for existence before any heavy work (`mytune validate` reports them as warnings).
    INPUT_PATHS: ClassVar[tuple[str, ...]] = ("checkpoint_dir", "tokenizer_path", "dataset_path", "dataset_val")
    # Of those, the fields that may name a Hugging Face hub dataset (`owner/name`) instead of a local path.
    HUB_DATASET_FIELDS: ClassVar[tuple[str, ...]] = ("dataset_path", "dataset_val")

    # Model and checkpoint
    checkpoint_dir: str = ""  # Hugging Face model directory (config.json + *.safetensors) to fine-tune
    model: str = ""  # named model builder (e.g. llama_tiny) for a seeded random start when checkpoint_dir is empty
    tokenizer_path: str = ""  # tokenizer file or directory; empty means the tokenizer files in checkpoint_dir
    output_dir: str = "outputs/full_finetune_distributed"  # checkpoints and metrics.jsonl are written here

    # Data (see mytune.data): formats instruct / chat / text, prompt formats, truncation, packing, tokenization cache
    dataset_path: str = ""  # training data: a .jsonl/.json/.csv/.txt/.parquet file, a folder of them, or a hub dataset owner/name
    dataset_format: Literal["auto", "instruct", "chat", "text"] = "auto"  # row format; auto: from the columns (instruction, messages/conversations, text)
    column_map: dict[str, str] = field(default_factory=dict)  # our column -> the dataset's, e.g. {instruction: prompt, output: response}
    chat_template: str = ""  # prompt format: alpaca, llama2, llama3, chatml, tokenizer or Jinja; empty = the tokenizer's, else alpaca/chatml
    train_on_input: bool = False  # also train on prompt tokens (by default only outputs / assistant turns are trained)
    max_seq_len: int = 2048  # tokens per sample (and per packed row); longer samples are truncated or dropped
    truncation: Literal["truncate", "drop"] = "truncate"  # samples over max_seq_len: cut (keeping the final eos) or left out; counted
    packed: bool = False  # pack several samples into each row of max_seq_len tokens (attention stays inside each sample)
    skip_bad_rows: bool = False  # skip and count unusable rows instead of stopping at the first one (named by file and line)
    dataset_cache_dir: str = ""  # tokenization cache; empty = $MYTUNE_DATA_CACHE or ~/.cache/mytune/datasets, off = no cache
    shuffle: bool = True  # reshuffle the dataset every epoch (seeded, the same order on every rank)

    # Validation: val_loss and val_perplexity in metrics.jsonl
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
    lr: float = 2e-5  # peak learning rate
    weight_decay: float = 0.0  # decoupled weight decay
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this (null: no clipping)

    # Memory and speed
    chunked_loss: bool = True  # output projection + cross-entropy loss_chunk_size tokens at a time (no full logits)
    loss_chunk_size: int = 1024  # tokens per chunk of the chunked loss
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward (less memory, ~+33% compute)
    activation_offloading: bool = False  # keep saved activations in CPU memory until the backward (GPU runs)
    compile: bool = False  # torch.compile each decoder layer (CPU needs a C++ compiler)

    # Checkpoints and resuming: output_dir/step_<N>/ holds the HF files plus recipe_state.pt
    save_every_n_steps: int = 0  # optimizer steps between checkpoints (0: only after the last step)
    keep_last_n_checkpoints: int | None = None  # delete older step_<N> directories after each save (null: keep all)
    resume_from_checkpoint: str = ""  # "" = a fresh run; latest = the newest complete step_<N> of output_dir (fresh if none); or a step_<N> path

    # Precision, device, reproducibility, logging
    dtype: Literal["bf16", "fp32"] = "bf16"  # compute dtype; parameters (saved as such), gradients and AdamW state stay fp32 (sharded)
    device: str = "auto"  # auto (cuda when available, else cpu), cpu or cuda; each rank uses cuda:LOCAL_RANK
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in CPU memory (GPU runs)
    seed: int = 0  # seeds model init, data order and dropout
    log_every_n_steps: int = 1  # optimizer steps between metrics lines
    metric_loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl (output_dir/metrics.jsonl), stdout, tensorboard, wandb
    profile: bool = False  # PyTorch profiler trace of a few steps in output_dir/profile/
    profile_steps: int = 3  # optimizer steps recorded by the profiler (after 1 skipped and 1 warm-up step)

    def __post_init__(self) -> None:
        if not self.checkpoint_dir and not self.model:
            raise ConfigError("checkpoint_dir is empty: set checkpoint_dir=<Hugging Face model dir> (or model=<builder> for a random start)")
        if not self.dataset_path:
            raise ConfigError("dataset_path is empty: set dataset_path=<data file, folder or hub dataset name>")
        if not self.checkpoint_dir and not self.tokenizer_path:
            raise ConfigError("tokenizer_path is empty and there is no checkpoint_dir to take the tokenizer from: set tokenizer_path=...")
        if not self.output_dir:
            raise ConfigError("output_dir is empty: set output_dir=<directory for checkpoints and metrics>")
        for name in ("max_seq_len", "epochs", "batch_size", "gradient_accumulation_steps", "log_every_n_steps",
                     "loss_chunk_size", "profile_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.save_every_n_steps < 0:
            raise ConfigError(f"save_every_n_steps must be >= 0 (0: only after the last step), got {self.save_every_n_steps}")
        if self.keep_last_n_checkpoints is not None and self.keep_last_n_checkpoints < 1:
            raise ConfigError(f"keep_last_n_checkpoints must be >= 1 or null (keep all), got {self.keep_last_n_checkpoints}")
        from mytune.training.metrics import check_metric_loggers  # here: importing the params stays torch-free
        from mytune.training.optim import check_optimizer

        check_optimizer(self.optimizer)
        check_metric_loggers(self.metric_loggers)
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda (each rank takes cuda:LOCAL_RANK), got {self.device!r}")
        if self.device == "cuda":
            from mytune.training.device import check_device_available

            check_device_available(self.device)
        if self.cpu_offload and self.device == "cpu":
            raise ConfigError("cpu_offload=true needs a GPU run (device=cuda or auto); with device=cpu everything is on the CPU already")
        self._check_data()

    def _check_data(self) -> None:
        if self.dataset_format not in ("auto", "instruct", "chat", "text"):
            raise ConfigError(f"dataset_format must be auto, instruct, chat or text, got {self.dataset_format!r}")
        for ours, theirs in self.column_map.items():
            if ours not in DATASET_COLUMNS:
                raise ConfigError(f"column_map: unknown column {ours!r}; keys are the columns mytune reads "
                                  f"({', '.join(DATASET_COLUMNS)}), values your dataset's names for them")
            if not isinstance(theirs, str) or not theirs:
                raise ConfigError(f"column_map: {ours!r} must map to a column name of your dataset, got {theirs!r}")
        is_jinja = "{{" in self.chat_template or "{%" in self.chat_template
        if self.chat_template and self.chat_template not in CHAT_TEMPLATES and not is_jinja:
            raise ConfigError(f"chat_template must be empty (the tokenizer's own), one of {', '.join(CHAT_TEMPLATES)} "
                              f"or a Jinja template string, got {self.chat_template!r}")
        if self.chat_template == "alpaca" and self.dataset_format == "chat":
            raise ConfigError("chat_template=alpaca renders instruct rows only; for dataset_format=chat use "
                              "llama2, llama3, chatml or tokenizer")
        if self.truncation not in ("truncate", "drop"):
            raise ConfigError(f"truncation must be truncate or drop, got {self.truncation!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be >= 0 and < 1, got {self.val_fraction}")
        if self.dataset_val and self.val_fraction > 0:
            raise ConfigError("dataset_val and val_fraction are both set: validate on dataset_val (val_fraction=0) "
                              "or on a fraction of dataset_path (dataset_val empty)")
        if self.eval_every_n_steps < 0:
            raise ConfigError(f"eval_every_n_steps must be >= 0 (0: only after the last step), got {self.eval_every_n_steps}")
        if self.eval_every_n_steps > 0 and not (self.dataset_val or self.val_fraction > 0):
            raise ConfigError(f"eval_every_n_steps={self.eval_every_n_steps} but there is no validation data: "
                              "set val_fraction (e.g. 0.05) or dataset_val, or eval_every_n_steps=0")
        if self.max_eval_batches is not None and self.max_eval_batches < 1:
            raise ConfigError(f"max_eval_batches must be >= 1 or null (the whole validation set), got {self.max_eval_batches}")
