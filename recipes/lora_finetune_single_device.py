"""LoRA, DoRA and QLoRA fine-tuning on a single device.

    mytune lora_finetune_single_device --config tiny_demo
    mytune lora_finetune_single_device --config llama3_1_8b --override checkpoint_dir=/models/Meta-Llama-3.1-8B-Instruct
    mytune lora_finetune_single_device --config llama3_1_8b_qlora --override checkpoint_dir=/models/Meta-Llama-3.1-8B-Instruct

The same recipe as `full_finetune_single_device` (the duplication is on purpose: read or copy one file), except that
the base model is frozen and `apply_lora` puts trainable adapters on the `lora_target_modules`: only they reach AdamW.
`use_dora` makes them DoRA adapters; `quantize_base` stores the targeted base weights in NF4 (QLoRA).

Each checkpoint is written twice, in one step directory:
    output_dir/step_<N>/           the merged model, a Hugging Face checkpoint (base + adapter folded into the weights)
    output_dir/step_<N>/adapter/   the adapter alone in PEFT format: `PeftModel.from_pretrained(base, that dir)`
A random start (`model=...`, the demo) has no base checkpoint on disk, so the recipe first saves it to
`output_dir/base_model/` and the adapter's `base_model_name_or_path` points there.
"""

import os
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mytune.checkpoint import load_hf_model, save_hf_checkpoint, save_peft_adapter
from mytune.config import TuneArgumentParser, find_missing_paths
from mytune.data import InstructDataset, load_rows, padded_collate
from mytune.errors import MytuneError, run_or_exit
from mytune.models import TransformerDecoder, model_args
from mytune.modules.lora import apply_lora, merge_lora, trainable_parameters
from mytune.tokenizers import load_tokenizer
from mytune.training.device import DTYPES, resolve_device, set_seed
from mytune.training.loss import count_label_tokens, cross_entropy_sum
from mytune.training.lr_schedule import build_lr_scheduler
from mytune.training.metrics import JsonlMetricLogger
from recipes.params.lora_finetune_single_device import LoRAFinetuneParams

ADAPTER_DIR_NAME = "adapter"


class LoRAFinetuneRecipeSingleDevice:
    """load_checkpoint -> setup -> train -> save_checkpoint -> cleanup."""

    def __init__(self, params: LoRAFinetuneParams):
        self.params = params
        self.device = resolve_device(params.device)
        self.dtype = DTYPES[params.dtype]
        self.output_dir = Path(params.output_dir)
        self.global_step = 0
        self.data_generator = set_seed(params.seed)

    def load_checkpoint(self) -> None:
        """Tokenizer and frozen base model as in the full recipe, then the adapters (seeded by set_seed above)."""
        p = self.params
        self.tokenizer = load_tokenizer(p.tokenizer_path or p.checkpoint_dir)
        if p.checkpoint_dir:
            # QLoRA reads the checkpoint into host memory: apply_lora below quantizes one layer at a time on the
            # device, so the full-precision model never has to fit there.
            load_device = "cpu" if p.quantize_base else self.device
            self.model = load_hf_model(p.checkpoint_dir, device=load_device, dtype=self.dtype)
            self.base_model_path = Path(p.checkpoint_dir).resolve()
        else:
            # A fresh model sized to the tokenizer: the demo and tests start here. Saved, so the adapter has a base.
            args = model_args(p.model)
            args.vocab_size = self.tokenizer.vocab_size
            args.bos_token_id, args.eos_token_id = self.tokenizer.bos_id, self.tokenizer.eos_id
            with self.device:
                self.model = TransformerDecoder(args)
            self.model.to(self.dtype)
            self.base_model_path = save_hf_checkpoint(
                self.model, self.output_dir / "base_model", dtype=self.dtype, tokenizer_files=self.tokenizer.files
            ).resolve()
        if self.tokenizer.vocab_size > self.model.args.vocab_size:
            raise MytuneError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's embedding has only "
                f"{self.model.args.vocab_size}: tokenizer_path does not belong to this checkpoint"
            )
        apply_lora(
            self.model, p.lora_target_modules, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
            use_dora=p.use_dora, quantize_base=p.quantize_base, device=self.device,
        )
        self.model.to(self.device)  # the untargeted rest (embeddings, norms) when it was loaded on the CPU

    def setup(self) -> None:
        p = self.params
        self.load_checkpoint()
        self.model.train()

        dataset = InstructDataset(
            load_rows(p.dataset_path),
            self.tokenizer,
            max_seq_len=p.max_seq_len,
            train_on_input=p.train_on_input,
            source=p.dataset_path,
        )
        self.dataloader = DataLoader(
            dataset,
            batch_size=p.batch_size,
            shuffle=p.shuffle,
            generator=self.data_generator,
            collate_fn=partial(padded_collate, pad_id=self.tokenizer.pad_id),
            drop_last=True,
        )
        self.steps_per_epoch = len(self.dataloader) // p.gradient_accumulation_steps
        if p.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, p.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise MytuneError(
                f"dataset_path has {len(dataset)} samples, fewer than one optimizer step needs "
                f"(batch_size * gradient_accumulation_steps = {p.batch_size * p.gradient_accumulation_steps})"
            )
        self.total_steps = self.steps_per_epoch * p.epochs

        # Only the adapters train: the frozen base gets neither gradients nor optimizer state.
        self.trainable = trainable_parameters(self.model)
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=p.lr, weight_decay=p.weight_decay, fused=self.device.type == "cuda"
        )
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, schedule=p.lr_scheduler, warmup_steps=p.warmup_steps, total_steps=self.total_steps
        )
        self.metric_logger = JsonlMetricLogger(self.output_dir / "metrics.jsonl")
        n_params = sum(t.numel() for t in self.model.parameters())
        n_trainable = sum(t.numel() for t in self.trainable)
        kind = ("QDoRA" if p.quantize_base else "DoRA") if p.use_dora else ("QLoRA" if p.quantize_base else "LoRA")
        print(
            f"lora_finetune_single_device: {kind} rank {p.lora_rank} on {', '.join(p.lora_target_modules)}: "
            f"{n_trainable / 1e6:.2f}M trainable of {n_params / 1e6:.1f}M params on {self.device} in {p.dtype}, "
            f"{len(dataset)} samples, {self.total_steps} steps",
            flush=True,
        )

    def train(self) -> None:
        p = self.params
        progress = tqdm(total=self.total_steps, desc="train", dynamic_ncols=True)
        tokens_since_log, seconds_since_log = 0, 0.0
        for epoch in range(p.epochs):
            batches = iter(self.dataloader)
            for _ in range(self.steps_per_epoch):
                step_start = time.perf_counter()
                micro_batches = [next(batches) for _ in range(p.gradient_accumulation_steps)]
                # Normalise by the label tokens of the whole optimizer step, not per micro-batch.
                num_label_tokens = sum(count_label_tokens(b["labels"]) for b in micro_batches)
                num_input_tokens = 0
                step_loss = 0.0
                for batch in micro_batches:
                    tokens = batch["tokens"].to(self.device)
                    labels = batch["labels"].to(self.device)
                    logits = self.model(tokens)
                    loss = cross_entropy_sum(logits, labels) / max(num_label_tokens, 1)
                    loss.backward()
                    step_loss += loss.item()
                    num_input_tokens += int((tokens != self.tokenizer.pad_id).sum())
                if not torch.isfinite(torch.tensor(step_loss)):
                    raise MytuneError(
                        f"loss is {step_loss} at step {self.global_step + 1}: training diverged; lower lr "
                        f"(now {p.lr}) or set max_grad_norm"
                    )
                grad_norm = None
                if p.max_grad_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, p.max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                lr = self.lr_scheduler.get_last_lr()[0]
                self.lr_scheduler.step()
                self.global_step += 1

                seconds = time.perf_counter() - step_start
                tokens_since_log += num_input_tokens
                seconds_since_log += seconds
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{num_input_tokens / seconds:.0f}")
                if self.global_step % p.log_every_n_steps == 0 or self.global_step == self.total_steps:
                    self.metric_logger.log(
                        {
                            "step": self.global_step,
                            "epoch": epoch,
                            "loss": step_loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens_per_s": tokens_since_log / seconds_since_log,
                            "num_tokens": tokens_since_log,
                        }
                    )
                    tokens_since_log, seconds_since_log = 0, 0.0
        progress.close()

    def save_checkpoint(self) -> Path:
        """`output_dir/step_<N>`: the merged Hugging Face checkpoint, and in it `adapter/`, the PEFT adapter.

        Merging leaves the training model untouched; the merged weights are built on the CPU one layer at a time,
        so saving needs no second copy of the targeted weights on the accelerator. Both directories appear atomically.
        """
        p = self.params
        out_dir = self.output_dir / f"step_{self.global_step}"
        merged = merge_lora(self.model, device="cpu")
        save_hf_checkpoint(merged, out_dir, dtype=self.dtype, tokenizer_files=self.tokenizer.files)
        del merged
        save_peft_adapter(
            self.model, out_dir / ADAPTER_DIR_NAME, base_model_name_or_path=str(self.base_model_path),
            targets=p.lora_target_modules, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
            use_dora=p.use_dora,
        )
        print(f"saved merged checkpoint to {out_dir} and the PEFT adapter to {out_dir / ADAPTER_DIR_NAME}", flush=True)
        return out_dir

    def cleanup(self) -> None:
        self.metric_logger.close()


def recipe_main(params: LoRAFinetuneParams) -> Path:
    """Run the whole recipe; returns the directory of the saved (merged) checkpoint, the adapter in its `adapter/`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MytuneError("lora_finetune_single_device runs on one device; start it without torchrun")
    missing = find_missing_paths(params)
    if missing:
        raise MytuneError(missing[0])
    recipe = LoRAFinetuneRecipeSingleDevice(params)
    recipe.setup()
    recipe.train()
    out_dir = recipe.save_checkpoint()
    recipe.cleanup()
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = TuneArgumentParser(LoRAFinetuneParams, recipe=__file__, description=LoRAFinetuneParams.__doc__)
    recipe_main(parser.parse_params(argv))


if __name__ == "__main__":
    run_or_exit(main, prog="lora_finetune_single_device")
