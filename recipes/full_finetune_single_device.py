"""Full fine-tuning on a single device.

    mytune full_finetune_single_device --config tiny_demo
    mytune full_finetune_single_device --config llama2_7b --override checkpoint_dir=/models/Llama-2-7b-hf

Every weight of the model is trained with AdamW on one device (CPU, one GPU or MPS). The file reads top to bottom:
`FullFinetuneRecipeSingleDevice` loads a Hugging Face checkpoint, sets up data and optimizer, trains with gradient
accumulation, and saves a Hugging Face checkpoint that `transformers` loads. Copy it (`mytune cp`) and change anything.
"""

import os
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mytune.checkpoint import load_hf_model, save_hf_checkpoint
from mytune.config import TuneArgumentParser, find_missing_paths
from mytune.data import InstructDataset, load_rows, padded_collate
from mytune.errors import MytuneError, run_or_exit
from mytune.models import TransformerDecoder, model_args
from mytune.tokenizers import load_tokenizer
from mytune.training.device import DTYPES, resolve_device, set_seed
from mytune.training.loss import count_label_tokens, cross_entropy_sum
from mytune.training.lr_schedule import build_lr_scheduler
from mytune.training.metrics import JsonlMetricLogger
from recipes.params.full_finetune_single_device import FullFinetuneParams


class FullFinetuneRecipeSingleDevice:
    """load_checkpoint -> setup -> train -> save_checkpoint -> cleanup."""

    def __init__(self, params: FullFinetuneParams):
        self.params = params
        self.device = resolve_device(params.device)
        self.dtype = DTYPES[params.dtype]
        self.output_dir = Path(params.output_dir)
        self.global_step = 0
        self.data_generator = set_seed(params.seed)

    def load_checkpoint(self) -> None:
        """Tokenizer from `tokenizer_path` (or the checkpoint); model from `checkpoint_dir`, or seeded random `model`."""
        p = self.params
        self.tokenizer = load_tokenizer(p.tokenizer_path or p.checkpoint_dir)
        if p.checkpoint_dir:
            self.model = load_hf_model(p.checkpoint_dir, device=self.device, dtype=self.dtype)
        else:
            # A fresh model sized to the tokenizer: the demo and tests start here, seeded by set_seed above.
            args = model_args(p.model)
            args.vocab_size = self.tokenizer.vocab_size
            args.bos_token_id, args.eos_token_id = self.tokenizer.bos_id, self.tokenizer.eos_id
            with self.device:
                self.model = TransformerDecoder(args)
            self.model.to(self.dtype)
        if self.tokenizer.vocab_size > self.model.args.vocab_size:
            raise MytuneError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's embedding has only "
                f"{self.model.args.vocab_size}: tokenizer_path does not belong to this checkpoint"
            )

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

        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=p.lr, weight_decay=p.weight_decay, fused=self.device.type == "cuda"
        )
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, schedule=p.lr_scheduler, warmup_steps=p.warmup_steps, total_steps=self.total_steps
        )
        self.metric_logger = JsonlMetricLogger(self.output_dir / "metrics.jsonl")
        n_params = sum(t.numel() for t in self.model.parameters())
        print(
            f"full_finetune_single_device: {n_params / 1e6:.1f}M params on {self.device} in {p.dtype}, "
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
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.max_grad_norm))
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
        """Hugging Face layout (config.json, safetensors, tokenizer files) in `output_dir/step_<N>`, written atomically."""
        out_dir = save_hf_checkpoint(
            self.model, self.output_dir / f"step_{self.global_step}", dtype=self.dtype, tokenizer_files=self.tokenizer.files
        )
        print(f"saved checkpoint to {out_dir}", flush=True)
        return out_dir

    def cleanup(self) -> None:
        self.metric_logger.close()


def recipe_main(params: FullFinetuneParams) -> Path:
    """Run the whole recipe; returns the directory of the saved checkpoint."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MytuneError("full_finetune_single_device runs on one device; use full_finetune_distributed under torchrun")
    missing = find_missing_paths(params)
    if missing:
        raise MytuneError(missing[0])
    recipe = FullFinetuneRecipeSingleDevice(params)
    recipe.setup()
    recipe.train()
    out_dir = recipe.save_checkpoint()
    recipe.cleanup()
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = TuneArgumentParser(FullFinetuneParams, recipe=__file__, description=FullFinetuneParams.__doc__)
    recipe_main(parser.parse_params(argv))


if __name__ == "__main__":
    run_or_exit(main, prog="full_finetune_single_device")
