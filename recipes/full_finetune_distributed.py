"""Full fine-tuning sharded over several processes with FSDP2 (one per GPU, or several CPU processes).

    mytune --nproc_per_node 8 full_finetune_distributed --config llama3_1_8b --override checkpoint_dir=/models/Llama-3.1-8B
    mytune --nproc_per_node 2 full_finetune_distributed --config tiny_demo          # CPU, gloo

The same recipe as `full_finetune_single_device`, adapted to FSDP2 (the duplication is on purpose: read or copy one
file). Differences: every rank builds the model on the meta device and `fully_shard`s each decoder layer and the root;
rank 0 reads the checkpoint and the weights are broadcast shard by shard; a `DistributedSampler` gives each rank its
part of every global batch; the loss of a step is normalised by the label tokens of the whole global batch, so the
gradient equals the single-device gradient of that batch; only rank 0 logs and writes the checkpoint.
"""

import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from mytune.checkpoint import load_hf_model, read_hf_config, save_hf_checkpoint
from mytune.config import TuneArgumentParser, find_missing_paths
from mytune.data import InstructDataset, load_rows, padded_collate
from mytune.errors import MytuneError, run_or_exit
from mytune.models import ModelArgs, TransformerDecoder, model_args
from mytune.tokenizers import load_tokenizer, write_tokenizer_files
from mytune.training import distributed
from mytune.training.device import set_seed
from mytune.training.loss import count_label_tokens, cross_entropy_sum
from mytune.training.lr_schedule import build_lr_scheduler
from mytune.training.metrics import JsonlMetricLogger
from recipes.params.full_finetune_distributed import FullFinetuneDistributedParams


class FullFinetuneRecipeDistributed:
    """load_checkpoint -> setup -> train -> save_checkpoint -> cleanup, on every rank."""

    def __init__(self, params: FullFinetuneDistributedParams):
        self.params = params
        self.dist = distributed.init_distributed(params.device)
        self.device = self.dist.device
        self.is_rank_zero = self.dist.is_rank_zero
        self.output_dir = Path(params.output_dir)
        self.global_step = 0
        set_seed(params.seed)  # the same seed on every rank: rank 0's random start and the data order

    def load_checkpoint(self) -> None:
        """Tokenizer on every rank; the model sharded over the ranks, its weights read by rank 0 only.

        From `checkpoint_dir`, or a seeded random `model`. Rank 0 holds the full float32 state dict on the CPU;
        the other ranks only learn the shapes (config.json / the builder). Weights stay float32 with dtype=bf16 too:
        the FSDP mixed-precision policy casts them for compute.
        """
        p = self.params
        self.tokenizer = load_tokenizer(p.tokenizer_path or p.checkpoint_dir)
        full_state_dict = None
        if p.checkpoint_dir:
            args = ModelArgs.from_hf_config(read_hf_config(p.checkpoint_dir))
            if self.is_rank_zero:
                full_state_dict = load_hf_model(p.checkpoint_dir, device="cpu", dtype=torch.float32).state_dict()
        else:
            # A fresh model sized to the tokenizer: the demo and tests start here, seeded by set_seed above.
            args = model_args(p.model)
            args.vocab_size = self.tokenizer.vocab_size
            args.bos_token_id, args.eos_token_id = self.tokenizer.bos_id, self.tokenizer.eos_id
            if self.is_rank_zero:
                full_state_dict = TransformerDecoder(args).state_dict()
        if self.tokenizer.vocab_size > args.vocab_size:
            raise MytuneError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's embedding has only "
                f"{args.vocab_size}: tokenizer_path does not belong to this checkpoint"
            )
        with torch.device("meta"):
            self.model = TransformerDecoder(args)
        distributed.shard_model(self.model, bf16=p.dtype == "bf16", cpu_offload=p.cpu_offload)
        distributed.load_full_state_dict(self.model, full_state_dict, self.device)
        del full_state_dict

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
        # Rank r takes samples r, r + world, r + 2 * world, ... (of the epoch's seeded order when shuffling).
        self.sampler = DistributedSampler(
            dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=p.shuffle, seed=p.seed, drop_last=True
        )
        self.dataloader = DataLoader(
            dataset,
            batch_size=p.batch_size,
            sampler=self.sampler,
            collate_fn=partial(padded_collate, pad_id=self.tokenizer.pad_id),
            drop_last=True,
        )
        self.steps_per_epoch = len(self.dataloader) // p.gradient_accumulation_steps
        if p.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, p.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise MytuneError(
                f"dataset_path has {len(dataset)} samples, fewer than one optimizer step needs "
                f"(batch_size * gradient_accumulation_steps * world size = "
                f"{p.batch_size * p.gradient_accumulation_steps * self.dist.world_size})"
            )
        self.total_steps = self.steps_per_epoch * p.epochs

        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=p.lr, weight_decay=p.weight_decay,
            fused=self.device.type == "cuda" and not p.cpu_offload,
        )
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, schedule=p.lr_scheduler, warmup_steps=p.warmup_steps, total_steps=self.total_steps
        )
        if self.is_rank_zero:
            self.metric_logger = JsonlMetricLogger(self.output_dir / "metrics.jsonl")
            n_params = sum(t.numel() for t in self.model.parameters())  # DTensor numel is the full size
            print(
                f"full_finetune_distributed: {n_params / 1e6:.1f}M params sharded over {self.dist.world_size} "
                f"process(es) on {self.device.type} in {p.dtype}, {len(dataset)} samples, {self.total_steps} steps",
                flush=True,
            )

    def train(self) -> None:
        p = self.params
        world_size = self.dist.world_size
        progress = tqdm(total=self.total_steps, desc="train", dynamic_ncols=True, disable=not self.is_rank_zero)
        for epoch in range(p.epochs):
            self.sampler.set_epoch(epoch)
            batches = iter(self.dataloader)
            for _ in range(self.steps_per_epoch):
                step_start = time.perf_counter()
                micro_batches = [next(batches) for _ in range(p.gradient_accumulation_steps)]
                # Normalise by the label tokens of the whole optimizer step on ALL ranks, not per rank or micro-batch.
                local_label_tokens = sum(count_label_tokens(b["labels"]) for b in micro_batches)
                local_input_tokens = sum(int((b["tokens"] != self.tokenizer.pad_id).sum()) for b in micro_batches)
                num_label_tokens, num_input_tokens = distributed.all_reduce_sum(
                    [local_label_tokens, local_input_tokens], self.device
                )
                local_loss = 0.0
                for batch in micro_batches:
                    tokens = batch["tokens"].to(self.device)
                    labels = batch["labels"].to(self.device)
                    logits = self.model(tokens)
                    loss = cross_entropy_sum(logits, labels) / max(num_label_tokens, 1)
                    # FSDP averages gradients over ranks; scaling by world_size turns that mean into the sum, so
                    # the gradient is that of sum(token losses of the global batch) / num_label_tokens.
                    (loss * world_size).backward()
                    local_loss += loss.item()
                (step_loss,) = distributed.all_reduce_sum([local_loss], self.device)
                if not torch.isfinite(torch.tensor(step_loss)):
                    raise MytuneError(
                        f"loss is {step_loss} at step {self.global_step + 1}: training diverged; lower lr "
                        f"(now {p.lr}) or set max_grad_norm"
                    )
                grad_norm = None
                if p.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.max_grad_norm)
                    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                lr = self.lr_scheduler.get_last_lr()[0]
                self.lr_scheduler.step()
                self.global_step += 1

                seconds = time.perf_counter() - step_start
                tokens_per_s = num_input_tokens / seconds  # all ranks' tokens: the job's throughput
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
                if self.is_rank_zero and (
                    self.global_step % p.log_every_n_steps == 0 or self.global_step == self.total_steps
                ):
                    self.metric_logger.log(
                        {
                            "step": self.global_step,
                            "epoch": epoch,
                            "loss": step_loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens_per_s": tokens_per_s,
                            "num_tokens": int(num_input_tokens),
                        }
                    )
        progress.close()

    def save_checkpoint(self) -> Path:
        """Hugging Face layout in `output_dir/step_<N>`: every rank gathers, rank 0 writes (atomically)."""
        out_dir = self.output_dir / f"step_{self.global_step}"
        full_model = distributed.gather_full_model(self.model)
        if self.is_rank_zero:
            dtype = torch.bfloat16 if self.params.dtype == "bf16" else torch.float32
            save_hf_checkpoint(full_model, out_dir, dtype=dtype)
            write_tokenizer_files(self.tokenizer, out_dir)
            print(f"saved checkpoint to {out_dir}", flush=True)
        del full_model
        distributed.barrier()  # no rank returns before the checkpoint exists
        return out_dir

    def cleanup(self) -> None:
        if self.is_rank_zero:
            self.metric_logger.close()
        distributed.destroy_distributed()


def recipe_main(params: FullFinetuneDistributedParams) -> Path:
    """Run the whole recipe on this rank; returns the directory of the saved checkpoint."""
    missing = find_missing_paths(params)
    if missing:
        raise MytuneError(missing[0])
    recipe = FullFinetuneRecipeDistributed(params)
    recipe.setup()
    recipe.train()
    out_dir = recipe.save_checkpoint()
    recipe.cleanup()
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = TuneArgumentParser(
        FullFinetuneDistributedParams, recipe=__file__, description=FullFinetuneDistributedParams.__doc__
    )
    recipe_main(parser.parse_params(argv))


if __name__ == "__main__":
    run_or_exit(main, prog="full_finetune_distributed")
