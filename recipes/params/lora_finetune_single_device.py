"""Parameters of the `lora_finetune_single_device` recipe: the one schema for its YAML configs and `--override`s.

The shared fields and their meaning are those of `full_finetune_single_device` (so a config moves between the two by
adding or dropping the `lora_*` fields), plus the adapter's settings.
"""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mytune.errors import ConfigError, MytuneError


@dataclass
class LoRAFinetuneParams:
    """LoRA / DoRA / QLoRA fine-tuning of a decoder LLM on one device: the base stays frozen, small adapters train."""

    # Fields checked for existence before any heavy work (`mytune validate` reports them as warnings).
    INPUT_PATHS: ClassVar[tuple[str, ...]] = ("checkpoint_dir", "tokenizer_path", "dataset_path")

    # Model and checkpoint
    checkpoint_dir: str = ""  # Hugging Face model directory (config.json + *.safetensors) to fine-tune
    model: str = ""  # named model builder (e.g. llama_tiny) for a seeded random start when checkpoint_dir is empty
    tokenizer_path: str = ""  # tokenizer file or directory; empty means the tokenizer files in checkpoint_dir
    output_dir: str = "outputs/lora_finetune_single_device"  # checkpoints and metrics.jsonl are written here

    # LoRA
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # layers that get adapters: q/k/v/o_proj, gate/up/down_proj, lm_head; or linear_qkv, linear_proj, linear_fc1, linear_fc2, output
    lora_rank: int = 8  # rank r of each adapter update B @ A
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input while training
    use_dora: bool = False  # DoRA: also learn a per-output magnitude over the normalised combined weight
    quantize_base: bool = False  # QLoRA: keep the frozen base weights of the targeted layers in NF4 (torchao)

    # Data
    dataset_path: str = ""  # alpaca-style .json/.jsonl file with instruction, input and output columns
    train_on_input: bool = False  # also train on prompt tokens (they are masked from the loss by default)
    max_seq_len: int = 2048  # samples are truncated to this many tokens (the final eos is kept)
    shuffle: bool = True  # reshuffle the dataset every epoch (seeded)

    # Optimisation
    epochs: int = 1  # passes over the dataset
    max_steps_per_epoch: int | None = None  # stop an epoch after this many optimizer steps (null: whole epoch)
    batch_size: int = 2  # samples per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate of AdamW (adapters only)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup
    max_grad_norm: float | None = 1.0  # clip the adapters' global gradient norm to this (null: no clipping)

    # Precision, device, reproducibility, logging
    dtype: Literal["bf16", "fp32"] = "bf16"  # parameter and compute dtype (base weights and adapters)
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps
    seed: int = 0  # seeds model init, adapter init, data order and dropout
    log_every_n_steps: int = 1  # optimizer steps between metrics.jsonl lines

    def __post_init__(self) -> None:
        if not self.checkpoint_dir and not self.model:
            raise ConfigError("checkpoint_dir is empty: set checkpoint_dir=<Hugging Face model dir> (or model=<builder> for a random start)")
        if not self.dataset_path:
            raise ConfigError("dataset_path is empty: set dataset_path=<alpaca-style .json or .jsonl file>")
        if not self.checkpoint_dir and not self.tokenizer_path:
            raise ConfigError("tokenizer_path is empty and there is no checkpoint_dir to take the tokenizer from: set tokenizer_path=...")
        if not self.output_dir:
            raise ConfigError("output_dir is empty: set output_dir=<directory for checkpoints and metrics>")
        for name in ("max_seq_len", "epochs", "batch_size", "gradient_accumulation_steps", "log_every_n_steps", "lora_rank"):
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
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        from mytune.modules.lora import resolve_lora_targets  # local: parsing other recipes' params stays torch-free

        try:
            resolve_lora_targets(self.lora_target_modules)
        except MytuneError as err:
            raise ConfigError(str(err)) from None
        if self.device not in ("auto", "cpu"):
            from mytune.training.device import check_device_available

            check_device_available(self.device)
