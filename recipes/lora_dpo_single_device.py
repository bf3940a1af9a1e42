"""Preference tuning (DPO, IPO, SimPO) with LoRA / DoRA / QLoRA adapters on a single device.

    mytune lora_dpo_single_device --config tiny_demo
    mytune lora_dpo_single_device --config llama3_1_8b --override checkpoint_dir=/models/Meta-Llama-3.1-8B-Instruct \
        dataset_path=my_pairs.jsonl

`lora_finetune_single_device` (the duplication is on purpose: read or copy one file) trained on preference pairs:
each row holds a prompt, a chosen and a rejected response (`mytune.data.preference`: TRL's standard and
conversational forms, or HH-RLHF style conversations sharing a prefix). A batch of B pairs is one forward of 2B rows
(chosen first, then rejected); each row's summed log-probability of its response tokens (`sequence_logps`) goes into
the preference loss (`loss_type`: dpo, ipo or simpo, TRL's definitions, `mytune.training.preference`).

The reference model is the policy with its adapters turned off (`adapters_disabled`): the frozen base, so no second
copy of the weights is held. Per batch it costs one more forward under no_grad; with `precompute_reference_logps`
the reference runs over the data once at setup (cached on disk next to the tokenized data, so a resumed run reads it)
and training runs the policy alone. SimPO needs no reference.

The loss of an optimizer step is the mean of its pairs' losses (summed over the micro-batches, divided by the pairs
of the step). Logged per step: loss, rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected} (means
over the step's pairs), lr, grad_norm, tokens_per_s, peak memory; a validation adds the same on the held-out pairs
(val_loss, val_rewards/accuracies, ...) every `eval_every_n_steps` and after the last step.

Checkpoints are those of the LoRA SFT recipe: `output_dir/step_<N>/` the merged Hugging Face model,
`step_<N>/adapter/` the PEFT adapter, `recipe_state.pt` for an exact resume (`resume_from_checkpoint=latest`); a random
start also writes `output_dir/base_model/`. SIGTERM saves one and exits 0; a nan loss stops naming the last good one.
"""

import dataclasses
import os
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mytune.checkpoint import load_hf_model, load_peft_adapter, save_hf_checkpoint, save_peft_adapter
from mytune.config import TuneArgumentParser, require_input_paths
from mytune.data import (
    ResumableDataLoader,
    ResumableSampler,
    build_preference_dataset,
    default_cache_dir,
    preference_collate,
    split_validation,
)
from mytune.errors import MytuneError, run_or_exit
from mytune.models import TransformerDecoder, model_args
from mytune.modules.lora import LoRALinear, apply_lora, merge_lora, trainable_parameters
from mytune.tokenizers import load_tokenizer
from mytune.training.device import DTYPES, move_batch, resolve_device, set_seed
from mytune.training.layer_wrappers import (
    activation_offloading,
    apply_activation_checkpointing,
    compile_layers,
    use_activation_offloading,
)
from mytune.training.lifetime import StopSignals, exit_with_launcher
from mytune.training.lr_schedule import build_lr_scheduler
from mytune.training.metrics import build_metric_loggers, run_summary, truncate_metrics
from mytune.training.optim import build_optimizer
from mytune.training.preference import (
    METRIC_NAMES,
    PreferenceLoss,
    preference_loss,
    preference_metric_tensor,
    preference_metrics,
    sequence_logps,
    sequence_logps_from_logits,
)
from mytune.training.profiling import maybe_profile, peak_memory_gib
from mytune.training.recipe_state import (
    apply_resume_precedence,
    load_recipe_state,
    params_record,
    prune_checkpoints,
    save_recipe_state,
)
from mytune.training.reference_logps import (
    WithReferenceLogps,
    adapters_disabled,
    checkpoint_identity,
    collate_with_reference,
    reference_logps_for,
)
from mytune.training.run_dir import claim_output_dir, remove_stale_cache_temps
from mytune.training.safety import check_finite
from recipes.params.lora_dpo_single_device import LoRADPOParams

ADAPTER_DIR_NAME = "adapter"


class LoRADPORecipeSingleDevice:
    """load_checkpoint -> setup -> train -> save_checkpoint -> cleanup."""

    def __init__(self, params: LoRADPOParams):
        self.params = params
        self.device = resolve_device(params.device)
        self.dtype = DTYPES[params.dtype]
        self.output_dir = Path(params.output_dir)
        self.global_step = 0
        self.epoch = 0
        # The output_dir is this run's until cleanup (a lock); None: a fresh run. A LoRA step_<N> also needs its
        # adapter/: the trained tensors are read back from there. Refuses to mix with another run's step_<N>.
        self.run_lock, self.resume_dir = claim_output_dir(params.output_dir, params.resume_from_checkpoint,
                                                          overwrite=params.overwrite_output_dir,
                                                          needs=(ADAPTER_DIR_NAME,))
        self.last_checkpoint = self.resume_dir  # the newest complete checkpoint, named when the loss turns nan
        self.last_saved_step = None
        self.last_logged: dict = {}  # the newest logged metrics, for the closing summary
        set_seed(params.seed)

    def load_checkpoint(self) -> None:
        """Frozen base model as in the LoRA SFT recipe (the tokenizer is loaded by `setup`), then the adapters (seeded
        by set_seed above; a resumed run then reads them back from the step's `adapter/`, bit for bit)."""
        p = self.params
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
        if self.resume_dir is not None:
            load_peft_adapter(self.model, self.resume_dir / ADAPTER_DIR_NAME)

    def setup(self) -> None:
        p = self.params
        # Tokenizer and data before the model: a bad dataset row fails in seconds, not after the weights are read.
        self.tokenizer = load_tokenizer(p.tokenizer_path or p.checkpoint_dir)
        self.setup_data()
        self.load_checkpoint()
        self.model.train()
        self.model.attention_backend = p.attention_backend
        self.offload_activations = use_activation_offloading(p.activation_offloading, self.device)
        # Neither changes parameter names or state-dict keys: checkpoints are the same with or without them.
        if p.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if p.compile:
            compile_layers(self.model)
        # The chunked log-probs multiply by lm_head's weight themselves, which would skip an adapter on lm_head.
        self.chunked_loss = p.chunked_loss and not isinstance(self.model.lm_head, LoRALinear)
        if p.precompute_reference_logps:
            self.precompute_reference()
        self.setup_loaders()

        self.steps_per_epoch = len(self.dataloader) // p.gradient_accumulation_steps
        if p.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, p.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise MytuneError(
                f"dataset_path has {len(self.dataloader.dataset)} preference pairs for training, fewer than one "
                f"optimizer step needs (batch_size * gradient_accumulation_steps = "
                f"{p.batch_size * p.gradient_accumulation_steps})"
            )
        self.total_steps = self.steps_per_epoch * p.epochs

        # Only the adapters train: the frozen base gets neither gradients nor optimizer state.
        self.trainable = trainable_parameters(self.model)
        self.optimizer = build_optimizer(self.trainable, p.optimizer, lr=p.lr, weight_decay=p.weight_decay,
                                         device=self.device)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, schedule=p.lr_scheduler, warmup_steps=p.warmup_steps, total_steps=self.total_steps
        )
        if self.resume_dir is not None:
            # Last: the RNG streams are set back to where the interrupted run was after its step.
            state = load_recipe_state(self.resume_dir, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler)
            self.global_step, self.epoch = state.global_step, state.epoch
            self.dataloader.load_state_dict(state.dataloader_state)
            self.last_saved_step = self.global_step
            print(f"resumed from {self.resume_dir} at step {self.global_step}", flush=True)
            # What the config and command line say now beats the checkpoint (lr, weight decay, schedule).
            changed = apply_resume_precedence(self.optimizer, self.lr_scheduler, saved=state.extra.get("params"),
                                              current=params_record(p, total_steps=self.total_steps),
                                              checkpoint_dir=self.resume_dir, global_step=self.global_step)
            if changed:
                print(f"changed since the checkpoint (the new values apply): {', '.join(changed)}", flush=True)
            if self.global_step == self.total_steps:
                print(f"{self.resume_dir} is the last step ({self.total_steps}): nothing left to train", flush=True)
        truncate_metrics(self.output_dir / "metrics.jsonl", self.global_step)  # one row per step after a resume
        self.metric_logger = build_metric_loggers(self.output_dir, p.metric_loggers, run_name=self.output_dir.name,
                                                  config=dataclasses.asdict(p))
        n_params = sum(t.numel() for t in self.model.parameters())
        n_trainable = sum(t.numel() for t in self.trainable)
        kind = ("QDoRA" if p.quantize_base else "DoRA") if p.use_dora else ("QLoRA" if p.quantize_base else "LoRA")
        reference = ("none (simpo)" if p.loss_type == "simpo" else
                     "precomputed" if p.precompute_reference_logps else "adapters off, per batch")
        print(
            f"lora_dpo_single_device: {p.loss_type} (beta {p.beta}) with {kind} rank {p.lora_rank} on "
            f"{', '.join(p.lora_target_modules)}: {n_trainable / 1e6:.2f}M trainable of {n_params / 1e6:.1f}M "
            f"params on {self.device} in {p.dtype}, reference {reference}, {self.total_steps} steps of "
            f"{p.batch_size * p.gradient_accumulation_steps} pairs with {p.optimizer}",
            flush=True,
        )

    def setup_data(self) -> None:
        """Tokenized preference datasets (read from the cache when this data was tokenized before) and a validation
        split. Each item holds the chosen and the rejected response with its prompt, tokens and labels (-100 on the
        prompt: only response tokens count)."""
        p = self.params
        self.cache_dir = None if p.dataset_cache_dir == "off" else (p.dataset_cache_dir or default_cache_dir())
        if self.cache_dir is not None:
            remove_stale_cache_temps(self.cache_dir)  # killed tokenizations' temporary folders
        build = partial(
            build_preference_dataset,
            tokenizer=self.tokenizer,
            max_seq_len=p.max_seq_len,
            column_map=p.column_map or None,
            chat_template=p.chat_template or None,
            skip_bad_rows=p.skip_bad_rows,
            truncation=p.truncation,
            cache_dir=self.cache_dir,
        )
        self.dataset = build(p.dataset_path)
        report_dataset("dataset_path", self.dataset)
        self.val_dataset = None
        if p.dataset_val:
            self.val_dataset = build(p.dataset_val)
            report_dataset("dataset_val", self.val_dataset)
        elif p.val_fraction > 0:
            self.dataset, self.val_dataset = split_validation(self.dataset, p.val_fraction, seed=p.seed)
            print(f"validation: {len(self.val_dataset)} of the pairs (val_fraction={p.val_fraction}), "
                  f"training: {len(self.dataset)}", flush=True)

    def precompute_reference(self) -> None:
        """The reference's log-probs of every training and validation pair, once (or read from the cache), attached
        to the datasets by index: the loaders' batches then carry them."""
        p = self.params
        identity = {"checkpoint": checkpoint_identity(self.base_model_path), "dtype": p.dtype,
                    "quantize_base": p.quantize_base, "chunked": self.chunked_loss}
        compute = partial(reference_logps_for, logps_fn=self.reference_logps, cache_dir=self.cache_dir,
                          model_identity=identity, batch_size=p.batch_size, collate=self.collate, device=self.device)
        self.dataset = WithReferenceLogps(self.dataset, compute(self.dataset, name="dataset_path"))
        if self.val_dataset is not None:
            self.val_dataset = WithReferenceLogps(self.val_dataset, compute(self.val_dataset, name="validation"))

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """`[2B, S]` rows (the B chosen, then the B rejected responses), with the precomputed reference log-probs when
        the items carry them."""
        return collate_with_reference(items, collate=partial(preference_collate, pad_id=self.tokenizer.pad_id))

    def setup_loaders(self) -> None:
        """The resumable training loader (its sampler's state is what a checkpoint needs to resume the data where it
        stopped: `self.dataloader.state_dict()`) and a fixed-order validation loader."""
        p = self.params
        sampler = ResumableSampler(self.dataset, rank=0, world_size=1, shuffle=p.shuffle, seed=p.seed)
        # Pinned on CUDA: move_batch's non-blocking copies then overlap the host's work.
        pin = self.device.type == "cuda"
        self.dataloader = ResumableDataLoader(self.dataset, batch_size=p.batch_size, sampler=sampler,
                                              collate_fn=self.collate, pin_memory=pin)
        self.val_dataloader = None
        if self.val_dataset is not None:
            # A plain DataLoader in a fixed order: every validation starts at the first batch; all of it is used.
            self.val_dataloader = DataLoader(self.val_dataset, batch_size=p.batch_size, shuffle=False,
                                             collate_fn=self.collate, pin_memory=pin)

    def train(self) -> None:
        """Optimizer steps from `global_step` (0, or where a resumed run stopped) to `total_steps`, saving a
        checkpoint every `save_every_n_steps`. On SIGTERM or Ctrl-C (preemption) it saves a checkpoint after the current
        step and returns early: `recipe_main` then finds that checkpoint saved and the process exits 0."""
        p = self.params
        tokens_since_log, seconds_since_log = 0, 0.0
        # A resumed run starts in the epoch and at the step where it stopped; its data loader continues there too.
        first_epoch, steps_done = divmod(self.global_step, self.steps_per_epoch)
        with (tqdm(total=self.total_steps, initial=self.global_step, desc="train", dynamic_ncols=True) as progress,
              StopSignals() as preemption,
              maybe_profile(p.profile, self.output_dir, active=p.profile_steps) as profiler):
            for epoch in range(first_epoch, p.epochs):
                self.epoch = epoch
                self.dataloader.set_epoch(epoch)  # this epoch's shuffle (a resumed epoch continues where it stopped)
                batches = iter(self.dataloader)
                for _ in range(self.steps_per_epoch - (steps_done if epoch == first_epoch else 0)):
                    step_start = time.perf_counter()
                    metrics = self.train_step([next(batches) for _ in range(p.gradient_accumulation_steps)])
                    profiler.step()

                    seconds = time.perf_counter() - step_start
                    tokens_since_log += metrics["num_tokens"]
                    seconds_since_log += seconds
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                         acc=f"{metrics['rewards/accuracies']:.2f}")
                    last_step = self.global_step == self.total_steps
                    evaluate = self.val_dataloader is not None and (
                        last_step or (p.eval_every_n_steps > 0 and self.global_step % p.eval_every_n_steps == 0)
                    )
                    if self.global_step % p.log_every_n_steps == 0 or last_step or evaluate:
                        metrics.update(epoch=epoch, tokens_per_s=tokens_since_log / seconds_since_log,
                                       num_tokens=tokens_since_log, peak_memory_gib=peak_memory_gib(self.device))
                        if evaluate:  # not timed in tokens_per_s: that counts training steps only
                            metrics.update(self.evaluate())
                            progress.write(f"step {self.global_step}: val_loss {metrics['val_loss']:.4f}, "
                                           f"val_rewards/accuracies {metrics['val_rewards/accuracies']:.3f}")
                        self.metric_logger.log(metrics)
                        self.last_logged = metrics  # for the run's closing summary
                        tokens_since_log, seconds_since_log = 0, 0.0
                    if preemption.should_stop:
                        progress.write(f"{preemption.received.name} at step {self.global_step}: saving a checkpoint "
                                       f"and stopping (resume with resume_from_checkpoint=latest)")
                        self.save_checkpoint()
                        return
                    if not last_step and p.save_every_n_steps > 0 and self.global_step % p.save_every_n_steps == 0:
                        self.save_checkpoint()

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict:
        """One optimizer step over `micro_batches` (gradient accumulation); returns its metrics."""
        p = self.params
        # The step's loss is the mean over all its pairs, not per micro-batch (each batch: B chosen + B rejected rows).
        num_pairs = sum(len(b["tokens"]) // 2 for b in micro_batches)
        num_input_tokens = sum(int(b["seq_lens"].sum()) for b in micro_batches)  # real tokens, no padding
        results = []  # detached; read after the loop: one device sync per step, not one per micro-batch
        for batch in micro_batches:
            batch = move_batch(batch, self.device)
            reference = self.batch_reference_logps(batch)  # first: its activations are gone before the policy's
            with activation_offloading(self.offload_activations):  # the forward only: the backward brings them back
                out, chosen, rejected = self.preference_forward(batch, reference)
            (out.losses.sum() / num_pairs).backward()
            results.append((out, chosen.detach(), rejected.detach()))
        out, chosen, rejected = concat_results(results)
        totals = torch.cat([out.losses.sum().view(1), preference_metric_tensor(out, chosen, rejected)])
        loss_sum, *metrics = totals.tolist()  # one host sync for the loss and the six metrics
        step_loss = loss_sum / num_pairs
        lr = float(self.lr_scheduler.get_last_lr()[0])  # torchao's low-bit AdamW keeps lr as a tensor
        # Before the optimizer step, so the last checkpoint named holds weights from before the divergence.
        check_finite(step_loss, self.global_step + 1, last_checkpoint=self.last_checkpoint, lr=lr, model=self.model)
        grad_norm = None
        if p.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, p.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.global_step += 1
        return {"step": self.global_step, "loss": step_loss, **dict(zip(METRIC_NAMES, metrics)), "lr": lr,
                "grad_norm": grad_norm, "num_tokens": num_input_tokens}

    def policy_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's summed log-probs of each row's response tokens (float32 `[2B]`) and their counts.

        With `chunked_loss` the model returns its final hidden states and the output projection runs inside
        `sequence_logps`, `loss_chunk_size` tokens at a time, so the `[2B, seq, vocab]` logits never exist at once.
        When lm_head is a LoRA target the log-probs come from the full logits (the projection goes through the adapter).
        """
        p = self.params
        if self.chunked_loss:
            hidden = self.model(batch["tokens"], return_hidden=True)
            return sequence_logps(hidden, self.model.lm_head.weight, batch["labels"], chunk_size=p.loss_chunk_size,
                                  positions=batch["label_positions"])
        return sequence_logps_from_logits(self.model(batch["tokens"]), batch["labels"])

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's `[B]` chosen and `[B]` rejected log-probs: the same forward with the adapters turned off."""
        with torch.no_grad(), adapters_disabled(self.model):
            logps, _ = self.policy_logps(batch)
        return logps.chunk(2)

    def batch_reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch's reference log-probs: precomputed ones from the batch, else one reference forward; None for
        SimPO (reference-free)."""
        if self.params.loss_type == "simpo":
            return None
        if "reference_chosen_logps" in batch:
            return batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        return self.reference_logps(batch)

    def preference_forward(self, batch: dict[str, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor] | None
                           ) -> tuple[PreferenceLoss, torch.Tensor, torch.Tensor]:
        """The policy's forward of the batch and the per-pair losses and rewards; also the policy's `[B]` chosen and
        rejected log-probs (for the logged logps/*)."""
        p = self.params
        logps, counts = self.policy_logps(batch)
        chosen, rejected = logps.chunk(2)
        chosen_counts, rejected_counts = counts.chunk(2)
        reference_chosen, reference_rejected = reference if reference is not None else (None, None)
        out = preference_loss(chosen, rejected, reference_chosen, reference_rejected, loss_type=p.loss_type,
                              beta=p.beta, label_smoothing=p.label_smoothing, simpo_gamma=p.simpo_gamma,
                              chosen_counts=chosen_counts, rejected_counts=rejected_counts)
        return out, chosen, rejected

    def evaluate(self) -> dict[str, float]:
        """The preference loss and metrics over the validation pairs (its first `max_eval_batches` batches), as
        `val_loss`, `val_rewards/accuracies`, ...: means over the pairs."""
        p = self.params
        self.model.eval()
        results = []
        with torch.no_grad():
            for index, batch in enumerate(self.val_dataloader):
                if p.max_eval_batches is not None and index >= p.max_eval_batches:
                    break
                batch = move_batch(batch, self.device)
                results.append(self.preference_forward(batch, self.batch_reference_logps(batch)))
        self.model.train()
        out, chosen, rejected = concat_results(results)
        metrics = {"loss": out.losses.mean().item(), **preference_metrics(out, chosen, rejected)}
        return {**{f"val_{name}": value for name, value in metrics.items()}, "val_pairs": len(out.losses)}

    def save_checkpoint(self) -> Path:
        """`output_dir/step_<N>`: the merged Hugging Face checkpoint, in it `adapter/` (the PEFT adapter), then
        `recipe_state.pt` (optimizer, LR schedule, RNG, data position, step, epoch) via a temporary file and a
        rename: a `step_<N>` with recipe_state.pt is complete. Keeps the newest `keep_last_n_checkpoints`. Saving
        the same step twice (a preemption right after a periodic save) writes nothing.

        Merging leaves the training model untouched; the merged weights are built on the CPU one layer at a time,
        so saving needs no second copy of the targeted weights on the accelerator. Both directories appear atomically.
        """
        p = self.params
        out_dir = self.output_dir / f"step_{self.global_step}"
        if self.last_saved_step == self.global_step and out_dir.is_dir():
            return out_dir
        merged = merge_lora(self.model, device="cpu")
        save_hf_checkpoint(merged, out_dir, dtype=self.dtype, tokenizer_files=self.tokenizer.files)
        del merged
        save_peft_adapter(
            self.model, out_dir / ADAPTER_DIR_NAME, base_model_name_or_path=str(self.base_model_path),
            targets=p.lora_target_modules, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
            use_dora=p.use_dora,
        )
        save_recipe_state(out_dir, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                          dataloader_state=self.dataloader.state_dict(), global_step=self.global_step,
                          epoch=self.epoch, extra={"params": params_record(p, total_steps=self.total_steps)})
        self.last_saved_step, self.last_checkpoint = self.global_step, out_dir
        if p.keep_last_n_checkpoints is not None:
            prune_checkpoints(self.output_dir, p.keep_last_n_checkpoints, protect=out_dir)
        print(f"saved merged checkpoint to {out_dir} and the PEFT adapter to {out_dir / ADAPTER_DIR_NAME}", flush=True)
        return out_dir

    def cleanup(self) -> None:
        self.metric_logger.close()
        self.run_lock.release()


def concat_results(results: list[tuple[PreferenceLoss, torch.Tensor, torch.Tensor]]
                   ) -> tuple[PreferenceLoss, torch.Tensor, torch.Tensor]:
    """The micro-batches' (or validation batches') per-pair results as one batch (losses detached)."""
    outs, chosen, rejected = zip(*results)
    out = PreferenceLoss(*(torch.cat([getattr(o, name).detach() for o in outs]) for name in PreferenceLoss._fields))
    return out, torch.cat(chosen), torch.cat(rejected)


def report_dataset(field: str, dataset) -> None:
    """One line of counts (pairs, tokens, truncated, dropped, bad rows skipped, cache), and the first skipped rows."""
    print(f"{field}: {dataset.summary()}", flush=True)
    for message in dataset.stats.get("skipped_examples", []):
        print(f"  skipped {message}", flush=True)


def recipe_main(params: LoRADPOParams) -> Path:
    """Run the whole recipe; returns the directory of the saved (merged) checkpoint, the adapter in its `adapter/`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MytuneError("lora_dpo_single_device runs on one device; use lora_dpo_distributed under torchrun")
    exit_with_launcher()  # under torchrun: stop (saving) when the launcher dies
    require_input_paths(params)  # hub dataset names (owner/name) are not missing paths
    recipe = LoRADPORecipeSingleDevice(params)
    try:
        recipe.setup()
        recipe.train()
        out_dir = recipe.save_checkpoint()
        recipe.cleanup()
        print(run_summary("lora_dpo_single_device", recipe.global_step, recipe.last_logged, out_dir, adapter=True),
              flush=True)
    finally:
        recipe.run_lock.release()  # also on an error: the output_dir is free for the next run
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = TuneArgumentParser(LoRADPOParams, recipe=__file__)
    recipe_main(parser.parse_params(argv))


if __name__ == "__main__":
    run_or_exit(main, prog="lora_dpo_single_device")
