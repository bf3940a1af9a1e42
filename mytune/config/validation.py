"""Checks the fine-tuning params dataclasses share: one place for each rule, one ConfigError line naming the field.

The four fine-tuning recipes read the same fields with the same meaning (the model and data sources, the optimizer
and schedule, checkpoints, the data pipeline's options); their params call these from `__post_init__` and add their
own checks (device, LoRA). Importing this module stays torch-free: `mytune ls` / `--help` parse params without torch.
"""

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from mytune.errors import ConfigError

DATASET_COLUMNS = ("instruction", "input", "output", "messages", "conversations", "text")  # keys of column_map
CHAT_TEMPLATES = ("alpaca", "llama2", "llama3", "chatml", "tokenizer")
POSITIVE_INT_FIELDS = ("max_seq_len", "epochs", "batch_size", "gradient_accumulation_steps", "log_every_n_steps",
                       "loss_chunk_size", "profile_steps")


def check_finite_floats(p: Any) -> None:
    """No float field holds nan or inf: none of them means anything there (`lr=nan` would pass `lr > 0` checks)."""
    for field in dataclasses.fields(p):
        value = getattr(p, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            default = f" (default {field.default!r})" if field.default is not dataclasses.MISSING else ""
            raise ConfigError(f"{field.name} must be a finite number, got {value}: set {field.name} to a "
                              f"number{default}")


def file_in_the_way(path: str | Path) -> Path | None:
    """The first existing component of `path` (itself or an ancestor) that is not a directory, else None."""
    path = Path(path).expanduser().absolute()
    for candidate in (*reversed(path.parents), path):
        if not candidate.exists():
            return None
        if not candidate.is_dir():
            return candidate
    return None


def check_output_dir(output_dir: str) -> None:
    """output_dir is (or can become) a directory this process may write: a file in the way or a read-only parent
    fails here, in one line, instead of at the first write. Nothing is created."""
    blocker = file_in_the_way(output_dir)
    if blocker is not None:
        what = "is a file" if blocker == Path(output_dir).expanduser().absolute() else f"is under the file {blocker}"
        raise ConfigError(f"output_dir={output_dir} {what}, not a directory: set output_dir to a directory path")
    path = Path(output_dir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be created in {existing})"
        raise ConfigError(f"output_dir={output_dir} is not writable{where}: make {existing} writable or set "
                          f"output_dir to a directory you can write")


def check_training_fields(p: Any) -> None:
    """Sources (model, data, tokenizer, output), sizes, optimizer, schedule, checkpoints, loggers and dtype."""
    check_finite_floats(p)
    if not p.checkpoint_dir and not p.model:
        raise ConfigError("checkpoint_dir is empty: set checkpoint_dir=<Hugging Face model dir> (or model=<builder> for a random start)")
    if not p.dataset_path:
        raise ConfigError("dataset_path is empty: set dataset_path=<data file, folder or hub dataset name>")
    if not p.checkpoint_dir and not p.tokenizer_path:
        raise ConfigError("tokenizer_path is empty and there is no checkpoint_dir to take the tokenizer from: set tokenizer_path=...")
    if not p.output_dir:
        raise ConfigError("output_dir is empty: set output_dir=<directory for checkpoints and metrics>")
    check_output_dir(p.output_dir)
    for name in POSITIVE_INT_FIELDS:
        if getattr(p, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(p, name)}")
    if p.max_steps_per_epoch is not None and p.max_steps_per_epoch < 1:
        raise ConfigError(f"max_steps_per_epoch must be >= 1 or null, got {p.max_steps_per_epoch}")
    if p.lr <= 0:
        raise ConfigError(f"lr must be > 0, got {p.lr}")
    if p.weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {p.weight_decay}")
    if p.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {p.warmup_steps}")
    if p.max_grad_norm is not None and p.max_grad_norm <= 0:
        raise ConfigError(f"max_grad_norm must be > 0 or null, got {p.max_grad_norm}")
    if p.dtype not in ("bf16", "fp32"):
        raise ConfigError(f"dtype must be bf16 or fp32, got {p.dtype!r}")
    if p.save_every_n_steps < 0:
        raise ConfigError(f"save_every_n_steps must be >= 0 (0: only after the last step), got {p.save_every_n_steps}")
    if p.keep_last_n_checkpoints is not None and p.keep_last_n_checkpoints < 1:
        raise ConfigError(f"keep_last_n_checkpoints must be >= 1 or null (keep all), got {p.keep_last_n_checkpoints}")
    if p.attention_backend == "flex" and p.device == "cpu":
        raise ConfigError("attention_backend=flex needs a CUDA GPU (flex_attention has no CPU backward in torch 2.13); "
                          "use attention_backend=auto or sdpa on the CPU")
    if getattr(p, "activation_offloading", False) and p.device == "cpu":
        raise ConfigError("activation_offloading=true needs a GPU (it moves saved activations from GPU to CPU memory); "
                          "device=cpu keeps them there already: set activation_offloading=false")
    from mytune.config.names import check_optimizer  # torch-free name tables: validate and --help skip torch
    from mytune.training.metrics import check_metric_loggers

    check_optimizer(p.optimizer)
    check_metric_loggers(p.metric_loggers)


def check_lora_fields(p: Any) -> None:
    """The adapter's rank, alpha, dropout and target module names."""
    if p.lora_rank < 1:
        raise ConfigError(f"lora_rank must be >= 1, got {p.lora_rank}")
    if p.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be > 0, got {p.lora_alpha}")
    if not 0 <= p.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {p.lora_dropout}")
    from mytune.config.names import resolve_lora_targets  # torch-free twin of mytune.modules.lora's

    resolve_lora_targets(p.lora_target_modules)


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")  # keys of a preference recipe's column_map
PREFERENCE_LOSSES = ("dpo", "ipo", "simpo")


def check_preference_fields(p: Any) -> None:
    """The preference recipes' loss fields (loss_type, beta, label_smoothing, simpo_gamma,
    precompute_reference_logps) and their data fields (one dataset_path, column_map, chat_template, truncation,
    validation split): the DPO-family recipes call this instead of `check_data_fields`, whose SFT fields they lack."""
    if p.loss_type not in PREFERENCE_LOSSES:
        raise ConfigError(f"loss_type must be one of {', '.join(PREFERENCE_LOSSES)}, got {p.loss_type!r}")
    if p.beta <= 0:
        raise ConfigError(f"beta must be > 0, got {p.beta}")
    if not 0 <= p.label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be >= 0 and < 0.5 (the assumed probability that a pair's preference "
                          f"is flipped), got {p.label_smoothing}")
    if p.label_smoothing > 0 and p.loss_type == "ipo":
        raise ConfigError("label_smoothing applies to loss_type=dpo and simpo (their sigmoid loss), not to ipo: set "
                          "label_smoothing=0 or another loss_type")
    if p.simpo_gamma < 0:
        raise ConfigError(f"simpo_gamma must be >= 0 (SimPO's target reward margin), got {p.simpo_gamma}")
    if p.precompute_reference_logps and p.loss_type == "simpo":
        raise ConfigError("precompute_reference_logps=true but loss_type=simpo uses no reference model: set "
                          "precompute_reference_logps=false")
    if not isinstance(p.dataset_path, str) or p.dataset_path.strip().startswith("["):
        raise ConfigError(f"dataset_path must name one source (a file, folder or hub dataset); the preference recipes "
                          f"do not mix datasets, got {p.dataset_path!r}")
    check_column_map(p.column_map, PREFERENCE_COLUMNS)
    check_chat_template(p.chat_template)
    if p.truncation not in ("truncate", "drop"):
        raise ConfigError(f"truncation must be truncate or drop, got {p.truncation!r}")
    check_validation_fields(p)


def check_column_map(column_map: dict, columns: tuple[str, ...]) -> None:
    """column_map's keys are columns mytune reads (`columns`), its values the dataset's non-empty names for them."""
    for ours, theirs in column_map.items():
        if ours not in columns:
            raise ConfigError(f"column_map: unknown column {ours!r}; keys are the columns mytune reads "
                              f"({', '.join(columns)}), values your dataset's names for them")
        if not isinstance(theirs, str) or not theirs:
            raise ConfigError(f"column_map: {ours!r} must map to a column name of your dataset, got {theirs!r}")


def check_chat_template(chat_template: str) -> None:
    """Empty (the tokenizer's own), a built-in template name, or a Jinja template string."""
    is_jinja = "{{" in chat_template or "{%" in chat_template
    if chat_template and chat_template not in CHAT_TEMPLATES and not is_jinja:
        raise ConfigError(f"chat_template must be empty (the tokenizer's own), one of {', '.join(CHAT_TEMPLATES)} "
                          f"or a Jinja template string, got {chat_template!r}")


def check_validation_fields(p: Any) -> None:
    """The held-out data: dataset_val or val_fraction (not both), how often to evaluate and how much of it."""
    if not 0 <= p.val_fraction < 1:
        raise ConfigError(f"val_fraction must be >= 0 and < 1, got {p.val_fraction}")
    if p.dataset_val and p.val_fraction > 0:
        raise ConfigError("dataset_val and val_fraction are both set: validate on dataset_val (val_fraction=0) "
                          "or on a fraction of dataset_path (dataset_val empty)")
    if p.eval_every_n_steps < 0:
        raise ConfigError(f"eval_every_n_steps must be >= 0 (0: only after the last step), got {p.eval_every_n_steps}")
    if p.eval_every_n_steps > 0 and not (p.dataset_val or p.val_fraction > 0):
        raise ConfigError(f"eval_every_n_steps={p.eval_every_n_steps} but there is no validation data: "
                          "set val_fraction (e.g. 0.05) or dataset_val, or eval_every_n_steps=0")
    if p.max_eval_batches is not None and p.max_eval_batches < 1:
        raise ConfigError(f"max_eval_batches must be >= 1 or null (the whole validation set), got {p.max_eval_batches}")


def check_distributed_device(p: Any) -> None:
    """FSDP runs on cpu (gloo) or cuda (each rank its cuda:LOCAL_RANK); CPU offload only makes sense from a GPU."""
    if p.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda (each rank takes cuda:LOCAL_RANK), got {p.device!r}")
    if p.device == "cuda":
        from mytune.training.device import check_device_available

        check_device_available(p.device)
    if p.cpu_offload and p.device == "cpu":
        raise ConfigError("cpu_offload=true needs a GPU run (device=cuda or auto); with device=cpu everything is on the CPU already")


def check_single_device(p: Any) -> None:
    """A named device (cuda, cuda:N, mps) must exist here; auto and cpu always do."""
    if p.device not in ("auto", "cpu"):
        from mytune.training.device import check_device_available

        check_device_available(p.device)


def check_distillation_fields(p: Any) -> None:
    """The teacher (a checkpoint, or a builder for a seeded random one), its dtype, kd_ratio, and the student's LoRA
    settings when it trains with adapters (`lora_target_modules` non-empty; empty: a full fine-tune)."""
    if not p.teacher_checkpoint_dir and not p.teacher_model:
        raise ConfigError("teacher_checkpoint_dir is empty: set teacher_checkpoint_dir=<Hugging Face model dir of the "
                          "teacher> (or teacher_model=<builder> for a seeded random teacher)")
    if p.teacher_dtype not in ("bf16", "fp32"):
        raise ConfigError(f"teacher_dtype must be bf16 or fp32, got {p.teacher_dtype!r}")
    if not 0 <= p.kd_ratio <= 1:
        raise ConfigError(f"kd_ratio must be in [0, 1] (the KL's share of the loss; the CE gets 1 - kd_ratio), "
                          f"got {p.kd_ratio}")
    if p.lora_target_modules:
        check_lora_fields(p)
    elif p.quantize_base:
        raise ConfigError("quantize_base=true quantizes the student's frozen base under LoRA adapters, but "
                          "lora_target_modules is empty (a full fine-tune): set lora_target_modules or quantize_base=false")


def check_tensor_parallel_fields(p: Any) -> None:
    """tensor_parallel_dim >= 1; sequence parallel needs tp > 1; float8 and QLoRA (quantize_base) are not built
    under TP (the launcher's world size is checked by the recipe, which knows it)."""
    tp = p.tensor_parallel_dim
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tensor_parallel_dim must be an integer >= 1 (1: FSDP alone), got {tp!r}")
    if p.sequence_parallel and tp == 1:
        raise ConfigError("sequence_parallel=true shards the sequence over the tensor-parallel ranks: set "
                          "tensor_parallel_dim > 1 (e.g. 2) or sequence_parallel=false")
    if tp > 1 and getattr(p, "float8", False):
        raise ConfigError(f"float8=true is not supported with tensor_parallel_dim={tp}: set float8=false or "
                          f"tensor_parallel_dim=1")
    if tp > 1 and getattr(p, "quantize_base", False):
        raise ConfigError(f"quantize_base=true (QLoRA) is not supported with tensor_parallel_dim={tp} (NF4 blocks "
                          f"cannot be split column-wise): set quantize_base=false or tensor_parallel_dim=1")


def check_float8(p: Any) -> None:
    """float8 matmuls need an NVIDIA GPU (compute capability 8.9+, checked by the recipe on its device)."""
    if p.float8 and p.device == "cpu":
        raise ConfigError("float8=true needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper); device=cpu: set float8=false")


def check_data_fields(p: Any) -> None:
    """The data pipeline's options: row format, column map, prompt template, truncation and validation split."""
    if p.dataset_format not in ("auto", "instruct", "chat", "text"):
        raise ConfigError(f"dataset_format must be auto, instruct, chat or text, got {p.dataset_format!r}")
    sources = dataset_sources(p.dataset_path)  # `[a, b]` from the command line becomes a list
    p.dataset_path = sources[0] if len(sources) == 1 else sources
    check_dataset_mix(sources, p.dataset_weights, p.dataset_formats, p.column_maps)
    if not isinstance(p.row_transform, str) or (p.row_transform and p.row_transform.count(":") != 1):
        raise ConfigError(f"row_transform must be an import path module:function (e.g. my_pkg.rows:to_chat) or "
                          f"empty, got {p.row_transform!r}")
    check_column_map(p.column_map, DATASET_COLUMNS)
    check_chat_template(p.chat_template)
    if p.chat_template == "alpaca" and p.dataset_format == "chat":
        raise ConfigError("chat_template=alpaca renders instruct rows only; for dataset_format=chat use "
                          "llama2, llama3, chatml or tokenizer")
    if p.truncation not in ("truncate", "drop"):
        raise ConfigError(f"truncation must be truncate or drop, got {p.truncation!r}")
    check_validation_fields(p)


def dataset_sources(value: Any) -> list[str]:
    """`dataset_path` as a list of sources: a list as is, `"[a, b]"` split, a single path as a one-item list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            return [item.strip().strip("'\"") for item in text[1:-1].split(",") if item.strip()]
        return [value] if value else []
    return [str(item) for item in value]


def check_dataset_mix(sources: list, weights: list, formats: list, column_maps: list) -> None:
    """Per-source lists match the sources (or are empty); weights positive and finite; one ConfigError line."""
    n = len(sources)
    for field, values in (("dataset_weights", weights), ("dataset_formats", formats), ("column_maps", column_maps)):
        if values and len(values) != n:
            raise ConfigError(f"{field} has {len(values)} entries but dataset_path names {n} source"
                              f"{'s' if n != 1 else ''}; give one entry per source (or none)")
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"dataset_weights[{index}] must be a positive finite number, got {weight!r}")
    for index, fmt in enumerate(formats):
        if fmt not in ("auto", "instruct", "chat", "text"):
            raise ConfigError(f"dataset_formats[{index}] must be auto, instruct, chat or text, got {fmt!r}")
    for index, column_map in enumerate(column_maps):
        if not isinstance(column_map, dict):
            raise ConfigError(f"column_maps[{index}] must be a mapping (e.g. {{output: answer}}), got {column_map!r}")
        for ours, theirs in column_map.items():
            if ours not in DATASET_COLUMNS or not isinstance(theirs, str) or not theirs:
                raise ConfigError(f"column_maps[{index}]: {ours!r}: {theirs!r} must map one of "
                                  f"{', '.join(DATASET_COLUMNS)} to a column name of that dataset")
