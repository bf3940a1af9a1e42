"""Hints for what users type: other tools' names for our params, and torchrun flags put after the recipe.

Edit distance finds `bacth_size`, but not `learning_rate` (HF Trainer) for `lr`, or `lora_r` (PEFT) for `lora_rank`;
these tables name what Hugging Face Trainer / TRL / PEFT, torchtune, Megatron and axolotl users bring along.
Everything here is plain data: importing it stays torch-free (`--help`, `validate`).
"""

import difflib

# Other tools' key -> our field (a hint is given only when the recipe's params have that field).
KEY_ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "n_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation": "gradient_accumulation_steps", "grad_accum": "gradient_accumulation_steps",
    "accumulate_grad_batches": "gradient_accumulation_steps",
    "output_path": "output_dir", "out_dir": "output_dir", "save_dir": "output_dir",
    "model_name_or_path": "checkpoint_dir", "pretrained_model_name_or_path": "checkpoint_dir",
    "checkpoint_path": "checkpoint_dir", "model_path": "checkpoint_dir", "model_dir": "checkpoint_dir",
    "base_model": "checkpoint_dir", "ckpt_dir": "checkpoint_dir", "load": "checkpoint_dir",
    "tokenizer": "tokenizer_path", "tokenizer_name_or_path": "tokenizer_path", "tokenizer_name": "tokenizer_path",
    "max_length": "max_seq_len", "seq_len": "max_seq_len", "seq_length": "max_seq_len",
    "max_seq_length": "max_seq_len", "cutoff_len": "max_seq_len", "sequence_len": "max_seq_len",
    "dataset": "dataset_path", "data_path": "dataset_path", "train_file": "dataset_path",
    "dataset_name": "dataset_path", "train_data": "dataset_path",
    "validation_file": "dataset_val", "eval_dataset": "dataset_val",
    "num_warmup_steps": "warmup_steps", "lr_warmup_steps": "warmup_steps", "lr_warmup_iters": "warmup_steps",
    "lr_scheduler_type": "lr_scheduler", "lr_decay_style": "lr_scheduler",
    "optim": "optimizer",
    "clip_grad_norm": "max_grad_norm", "clip_grad": "max_grad_norm", "grad_clip": "max_grad_norm",
    "gradient_clipping": "max_grad_norm", "max_norm": "max_grad_norm",
    "lora_r": "lora_rank", "r": "lora_rank", "rank": "lora_rank",
    "target_modules": "lora_target_modules", "lora_target": "lora_target_modules",
    "lora_attn_modules": "lora_target_modules",
    "random_seed": "seed", "data_seed": "seed",
    "logging_steps": "log_every_n_steps", "log_interval": "log_every_n_steps",
    "save_steps": "save_every_n_steps", "save_interval": "save_every_n_steps",
    "save_total_limit": "keep_last_n_checkpoints",
    "eval_steps": "eval_every_n_steps", "eval_interval": "eval_every_n_steps",
    "gradient_checkpointing": "activation_checkpointing", "enable_activation_checkpointing": "activation_checkpointing",
    "recompute_activations": "activation_checkpointing",
    "enable_activation_offloading": "activation_offloading",
    "packing": "packed", "sample_packing": "packed",
    "torch_compile": "compile",
    "report_to": "metric_loggers",
    "torch_dtype": "dtype", "precision": "dtype",
}

# Keys whose meaning differs from ours: what to set instead, keyed by the field that must exist.
KEY_EXPLANATIONS: dict[str, tuple[str, str]] = {
    "warmup_ratio": ("warmup_steps", "mytune counts warmup in optimizer steps: set warmup_steps to warmup_ratio x "
                                     "the run's optimizer steps (e.g. 0.03 x 1000 steps = warmup_steps=30)"),
    "max_steps": ("max_steps_per_epoch", "mytune stops each epoch after max_steps_per_epoch optimizer steps "
                                         "(with epochs=1 that is the run's total)"),
    "train_iters": ("max_steps_per_epoch", "mytune stops each epoch after max_steps_per_epoch optimizer steps "
                                           "(with epochs=1 that is the run's total)"),
    "bf16": ("dtype", "mytune has one dtype field: set dtype=bf16 (or dtype=fp32)"),
    "fp16": ("dtype", "mytune trains in bf16 or fp32: set dtype=bf16 (fp16 is not supported)"),
    "fp32": ("dtype", "mytune has one dtype field: set dtype=fp32"),
    "mixed_precision": ("dtype", "mytune has one dtype field: set dtype=bf16 or dtype=fp32"),
}


def unknown_key_hint(key: str, fields: list[str]) -> str:
    """The end of an "unknown key" message: a known alias, an explanation, else the closest field by spelling."""
    lowered = key.lower().replace("-", "_")
    if KEY_ALIASES.get(lowered) in fields:
        return f"; mytune calls it `{KEY_ALIASES[lowered]}`"
    if lowered in KEY_EXPLANATIONS and KEY_EXPLANATIONS[lowered][0] in fields:
        return f"; {KEY_EXPLANATIONS[lowered][1]}"
    close = difflib.get_close_matches(key, fields, n=1)
    return f"; did you mean `{close[0]}`?" if close else " (see --help for the valid keys)"


# torchrun's flags (torch.distributed.run), both spellings; the value-less ones are in LAUNCHER_SWITCHES.
LAUNCHER_FLAGS = frozenset({
    "nnodes", "nproc_per_node", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "rdzv_conf", "standalone",
    "max_restarts", "monitor_interval", "start_method", "event_log_handler", "role", "module", "no_python",
    "run_path", "log_dir", "redirects", "tee", "local_ranks_filter", "duplicate_stdout_filters",
    "duplicate_stderr_filters", "node_rank", "master_addr", "master_port", "local_addr", "logs_specs",
    "numa_binding", "signals_to_handle", "shutdown_timeout", "virtual_local_rank",
})
LAUNCHER_SWITCHES = frozenset({"standalone", "module", "no_python", "run_path", "virtual_local_rank"})


def launcher_flag_name(arg: str) -> str | None:
    """`--nproc-per-node=2` / `--nproc_per_node` -> `nproc_per_node` when it is a torchrun flag, else None."""
    if not arg.startswith("--"):
        return None
    name = arg[2:].partition("=")[0].replace("-", "_")
    return name if name in LAUNCHER_FLAGS else None


def misplaced_launcher_flags(recipe: str, args: list[str], before: list[str] = ()) -> str | None:
    """A one-line hint when `args` (what follows the recipe) hold torchrun flags, else None; `before` are the
    launcher flags already in front of the recipe.

    "put launcher flags before the recipe: mytune --nproc_per_node 2 full_finetune_distributed --config x".
    """
    moved: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        name = launcher_flag_name(arg)
        if name is None:
            rest.append(arg)
        else:
            moved.append(arg)
            takes_value = name not in LAUNCHER_SWITCHES and "=" not in arg
            if takes_value and index + 1 < len(args):
                index += 1
                moved.append(args[index])
        index += 1
    if not moved:
        return None
    command = " ".join(["mytune", *before, *moved, recipe, *rest])
    return f"{' '.join(a for a in moved if a.startswith('--'))} is a torchrun flag: put launcher flags before the " \
           f"recipe: {command}"
