"""Knowledge distillation on a single device: a frozen teacher LLM teaches a smaller student of the same family.

    mytune knowledge_distillation_single_device --config tiny_demo
    mytune knowledge_distillation_single_device --config llama3_2_1b \\
        --override checkpoint_dir=/models/Llama-3.2-1B-Instruct teacher_checkpoint_dir=/models/Llama-3.1-8B-Instruct

The student trains on `(1 - kd_ratio) * CE + kd_ratio * KL(teacher || student)` over the response tokens of SFT data:
the CE against the data's labels as in `full_finetune_single_device`, the KL against the teacher's next-token
distribution at the same positions. Both sums are divided by the label tokens of the whole optimizer step (as every
mytune loss is), and both run `loss_chunk_size` tokens at a time (`mytune.training.distillation`), so no
`[tokens, vocab]` logits of either model exist at once. The file is `full_finetune_single_device` (the same data,
validation, loop, checkpoints; the duplication is on purpose: read or copy one file) plus the teacher:
- `teacher_checkpoint_dir`: a Hugging Face checkpoint, frozen, in eval mode, in `teacher_dtype`, optionally with its
  decoder-layer linears in NF4 (`teacher_quantize`, as QLoRA stores its base) so an 8B teacher fits beside a 1B
  student. Its tokenizer must read text as the student's does (refused in one line otherwise); a larger teacher
  embedding (padding rows) is compared over the student's vocabulary. `teacher_model`: a seeded random teacher
  (seed + 1) instead, for the offline demo and tests.
- `lora_target_modules`: empty trains every student weight; non-empty trains LoRA adapters on the student as
  `lora_finetune_single_device` does (`use_dora`, `quantize_base`), and each checkpoint then also holds the PEFT
  adapter in `step_<N>/adapter/` beside the merged model.

Checkpoints: `output_dir/step_<N>/` holds the student's Hugging Face files plus `recipe_state.pt` (optimizer, LR
schedule, RNG, data position, step and epoch), so `resume_from_checkpoint=latest` continues the run exactly where it
stopped (the teacher is read again as at the start). A checkpoint every `save_every_n_steps`; SIGTERM saves one and
exits 0; a nan loss stops naming the last good checkpoint. Metrics: loss, ce_loss, kd_loss, lr, grad_norm,
tokens_per_s, peak_memory_gib (and val_loss, val_ce_loss, val_kd_loss, val_perplexity of the CE).
"""

import dataclasses
import math
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
    build_dataset_mix,
    build_sft_dataset,
    default_cache_dir,
    padded_collate,
    split_validation,
)
from mytune.errors import MytuneError, run_or_exit
from mytune.models import TransformerDecoder, model_args
from mytune.modules.lora import LoRALinear, apply_lora, merge_lora, trainable_parameters
from mytune.tokenizers import load_tokenizer
from mytune.training.device import DTYPES, move_batch, resolve_device, set_seed
from mytune.training.distillation import (
    check_same_tokenizer,
    distillation_loss_sums,
    distillation_loss_sums_from_logits,
    quantize_teacher,
)
from mytune.training.layer_wrappers import (
    activation_offloading,
    apply_activation_checkpointing,
    compile_layers,
    use_activation_offloading,
)
from mytune.training.loss import count_label_tokens
from mytune.training.lr_schedule import build_lr_scheduler
from mytune.training.lifetime import StopSignals, exit_with_launcher
from mytune.training.metrics import build_metric_loggers, run_summary, truncate_metrics
from mytune.training.optim import build_optimizer
from mytune.training.profiling import maybe_profile, peak_memory_gib
from mytune.training.recipe_state import (
    apply_resume_precedence,
    load_recipe_state,
    params_record,
    prune_checkpoints,
    save_recipe_state,
)
from mytune.training.run_dir import claim_output_dir, remove_stale_cache_temps
from mytune.training.safety import check_finite
from recipes.params.knowledge_distillation_single_device import KnowledgeDistillationParams

ADAPTER_DIR_NAME = "adapter"


class KnowledgeDistillationRecipeSingleDevice:
    """load_checkpoint -> load_teacher -> setup -> train -> save_checkpoint -> cleanup."""

    def __init__(self, params: KnowledgeDistillationParams):
        self.params = params
        self.device = resolve_device(params.device)
        self.dtype = DTYPES[params.dtype]
        self.output_dir = Path(params.output_dir)
        self.lora = bool(params.lora_target_modules)  # else the student is fine-tuned in full
        self.global_step = 0
        self.epoch = 0
        # The output_dir is this run's until cleanup (a lock); None: a fresh run. A LoRA step_<N> also needs its
        # adapter/: the trained tensors are read back from there. Refuses to mix with another run's step_<N>.
        self.run_lock, self.resume_dir = claim_output_dir(params.output_dir, params.resume_from_checkpoint,
                                                          overwrite=params.overwrite_output_dir,
                                                          needs=(ADAPTER_DIR_NAME,) if self.lora else ())
        self.last_checkpoint = self.resume_dir  # the newest complete checkpoint, named when the loss turns nan
        self.last_saved_step = None
        self.last_logged: dict = {}  # the newest logged metrics, for the closing summary
        set_seed(params.seed)

    def load_checkpoint(self) -> None:
        """The student (the tokenizer is loaded by `setup`). Full: from the resumed `step_<N>`, from
        `checkpoint_dir`, or a seeded random `model` sized to the tokenizer. LoRA: the frozen base from
        `checkpoint_dir` or the seeded random start (saved to `output_dir/base_model/` for the adapter to name), then
        the adapters (seeded; a resumed run reads them back from the step's `adapter/`, bit for bit)."""
        p = self.params
        source = p.checkpoint_dir if self.lora else (self.resume_dir or p.checkpoint_dir)
        if source:
            # QLoRA reads the checkpoint into host memory: apply_lora quantizes one layer at a time on the device.
            load_device = "cpu" if p.quantize_base else self.device
            self.model = load_hf_model(source, device=load_device, dtype=self.dtype)
            self.base_model_path = Path(source).resolve()
        else:
            # A fresh model sized to the tokenizer: the demo and tests start here, seeded by set_seed above.
            args = model_args(p.model)
            args.vocab_size = self.tokenizer.vocab_size
            args.bos_token_id, args.eos_token_id = self.tokenizer.bos_id, self.tokenizer.eos_id
            with self.device:
                self.model = TransformerDecoder(args)
            self.model.to(self.dtype)
            if self.lora:
                self.base_model_path = save_hf_checkpoint(
                    self.model, self.output_dir / "base_model", dtype=self.dtype, tokenizer_files=self.tokenizer.files
                ).resolve()
        if self.tokenizer.vocab_size > self.model.args.vocab_size:
            raise MytuneError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's embedding has only "
                f"{self.model.args.vocab_size}: tokenizer_path does not belong to this checkpoint"
            )
        if self.lora:
            apply_lora(
                self.model, p.lora_target_modules, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
                use_dora=p.use_dora, quantize_base=p.quantize_base, device=self.device,
            )
            self.model.to(self.device)  # the untargeted rest (embeddings, norms) when it was loaded on the CPU
            if self.resume_dir is not None:
                load_peft_adapter(self.model, self.resume_dir / ADAPTER_DIR_NAME)

    def load_teacher(self) -> None:
        """The frozen teacher in eval mode and `teacher_dtype`: from `teacher_checkpoint_dir` (whose tokenizer must
        match the student's), or a random `teacher_model` seeded with seed + 1 (built on the CPU under its own RNG
        state, so the global stream, and with it the student's training, is the same as without it)."""
        p = self.params
        teacher_dtype = DTYPES[p.teacher_dtype]
        if p.teacher_checkpoint_dir:
            check_same_tokenizer(self.tokenizer, load_tokenizer(p.teacher_checkpoint_dir),
                                 student_path=p.tokenizer_path or p.checkpoint_dir,
                                 teacher_path=p.teacher_checkpoint_dir)
            # NF4: read into host memory, quantized one layer at a time on the device.
            load_device = "cpu" if p.teacher_quantize else self.device
            self.teacher = load_hf_model(p.teacher_checkpoint_dir, device=load_device, dtype=teacher_dtype)
        else:
            args = model_args(p.teacher_model)
            args.vocab_size = self.tokenizer.vocab_size
            args.bos_token_id, args.eos_token_id = self.tokenizer.bos_id, self.tokenizer.eos_id
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(p.seed + 1)
                self.teacher = TransformerDecoder(args).to(teacher_dtype)
        if self.teacher.args.vocab_size < self.model.args.vocab_size:
            raise MytuneError(f"the teacher's embedding has {self.teacher.args.vocab_size} rows, fewer than the "
                              f"student's {self.model.args.vocab_size}: the teacher cannot score every student token")
        if p.teacher_quantize:
            quantize_teacher(self.teacher, device=self.device)
        self.teacher.to(self.device)
        self.teacher.eval().requires_grad_(False)
        self.teacher.attention_backend = p.attention_backend

    def setup(self) -> None:
        p = self.params
        # Tokenizer and data before the models: a bad dataset row fails in seconds, not after the weights are read.
        self.tokenizer = load_tokenizer(p.tokenizer_path or p.checkpoint_dir)
        self.setup_data()
        self.load_checkpoint()
        self.load_teacher()
        self.model.train()
        self.model.attention_backend = p.attention_backend  # "auto": flex for packed rows on CUDA
        self.offload_activations = use_activation_offloading(p.activation_offloading, self.device)
        # Neither changes parameter names or state-dict keys: checkpoints are the same with or without them.
        if p.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if p.compile:
            compile_layers(self.model)
        # The chunked loss multiplies by lm_head's weight itself, which would skip an adapter on lm_head.
        self.chunked_loss = p.chunked_loss and not isinstance(self.model.lm_head, LoRALinear)

        self.steps_per_epoch = len(self.dataloader) // p.gradient_accumulation_steps
        if p.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, p.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise MytuneError(
                f"dataset_path has {len(self.dataloader.dataset)} {'packed rows' if p.packed else 'samples'} for "
                f"training, fewer than one optimizer step needs "
                f"(batch_size * gradient_accumulation_steps = {p.batch_size * p.gradient_accumulation_steps})"
            )
        self.total_steps = self.steps_per_epoch * p.epochs

        # LoRA: only the adapters train; the frozen base gets neither gradients nor optimizer state.
        self.trainable = trainable_parameters(self.model) if self.lora else list(self.model.parameters())
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
        n_teacher = sum(t.numel() for t in self.teacher.parameters())
        student = (f"LoRA rank {p.lora_rank} on {', '.join(p.lora_target_modules)}: " if self.lora else "") + \
            f"{n_trainable / 1e6:.2f}M trainable of {n_params / 1e6:.2f}M params"
        print(
            f"knowledge_distillation_single_device: student {student} in {p.dtype}, teacher "
            f"{n_teacher / 1e6:.2f}M params in {'nf4/' if p.teacher_quantize else ''}{p.teacher_dtype}, on "
            f"{self.device}, kd_ratio {p.kd_ratio}, {self.total_steps} steps of "
            f"{p.batch_size * p.gradient_accumulation_steps} {'packed rows' if p.packed else 'samples'} "
            f"with {p.optimizer}",
            flush=True,
        )

    def setup_data(self) -> None:
        """Tokenized datasets (read from the cache when this data was tokenized before), a validation split, loaders.

        Items are samples, or packed rows of several samples when `packed`; batches hold `tokens` and `labels`
        (and `position_ids` / `document_ids` when packed). The sampler's state (epoch, samples consumed) is what a
        checkpoint needs to resume the data where it stopped: `self.dataloader.state_dict()`.
        """
        p = self.params
        cache_dir = None if p.dataset_cache_dir == "off" else (p.dataset_cache_dir or default_cache_dir())
        if cache_dir is not None:
            remove_stale_cache_temps(cache_dir)  # killed tokenizations' temporary folders
        build = partial(
            build_sft_dataset,
            tokenizer=self.tokenizer,
            max_seq_len=p.max_seq_len,
            dataset_format=None if p.dataset_format == "auto" else p.dataset_format,
            column_map=p.column_map,
            chat_template=p.chat_template or None,
            train_on_input=p.train_on_input,
            truncation=p.truncation,
            packed=p.packed,
            skip_bad_rows=p.skip_bad_rows,
            row_transform=p.row_transform or None,
            cache_dir=cache_dir,
        )
        dataset = build_dataset_mix(build, p.dataset_path, weights=p.dataset_weights, formats=p.dataset_formats,
                                     column_maps=p.column_maps)
        report_dataset("dataset_path", dataset)
        val_dataset = None
        if p.dataset_val:
            val_dataset = build(p.dataset_val)
            report_dataset("dataset_val", val_dataset)
        elif p.val_fraction > 0:
            dataset, val_dataset = split_validation(dataset, p.val_fraction, seed=p.seed)
            print(f"validation: {val_dataset.num_samples} of the samples (val_fraction={p.val_fraction}), "
                  f"training: {dataset.num_samples}", flush=True)

        collate = partial(padded_collate, pad_id=self.tokenizer.pad_id)
        sampler = ResumableSampler(dataset, rank=0, world_size=1, shuffle=p.shuffle, seed=p.seed)
        # Pinned on CUDA: move_batch's non-blocking copies then overlap the host's work.
        pin = self.device.type == "cuda"
        self.dataloader = ResumableDataLoader(dataset, batch_size=p.batch_size, sampler=sampler, collate_fn=collate,
                                              pin_memory=pin)
        self.val_dataloader = None
        if val_dataset is not None:
            # A plain DataLoader in a fixed order: every validation starts at the first batch; all of it is used.
            self.val_dataloader = DataLoader(val_dataset, batch_size=p.batch_size, shuffle=False, collate_fn=collate,
                                             pin_memory=pin)

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
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", kd=f"{metrics['kd_loss']:.4f}",
                                         tok_s=f"{metrics['num_tokens'] / seconds:.0f}")
                    last_step = self.global_step == self.total_steps
                    evaluate = self.val_dataloader is not None and (
                        last_step or (p.eval_every_n_steps > 0 and self.global_step % p.eval_every_n_steps == 0)
                    )
                    if self.global_step % p.log_every_n_steps == 0 or last_step or evaluate:
                        metrics.update(epoch=epoch, tokens_per_s=tokens_since_log / seconds_since_log,
                                       num_tokens=tokens_since_log, peak_memory_gib=peak_memory_gib(self.device))
                        if evaluate:  # not timed in tokens_per_s: that counts training steps only
                            metrics.update(self.evaluate())
                            progress.write(f"step {self.global_step}: val_loss {metrics['val_loss']:.4f} "
                                           f"(ce {metrics['val_ce_loss']:.4f}, kd {metrics['val_kd_loss']:.4f})")
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
        # Normalise by the label tokens of the whole optimizer step, not per micro-batch.
        num_label_tokens = sum(count_label_tokens(b["labels"]) for b in micro_batches)
        num_input_tokens = sum(int(b["seq_lens"].sum()) for b in micro_batches)  # real tokens, no padding
        micro_losses = []  # (ce, kd) read after the loop: one device sync per step, not one per micro-batch
        for batch in micro_batches:
            batch = move_batch(batch, self.device)
            with activation_offloading(self.offload_activations):  # the forward only: the backward brings them back
                ce, kd = (loss / max(num_label_tokens, 1) for loss in self.loss_sums(batch))
            ((1 - p.kd_ratio) * ce + p.kd_ratio * kd).backward()
            micro_losses.append(torch.stack([ce.detach(), kd.detach()]))
        ce_loss, kd_loss = torch.stack(micro_losses).sum(0).tolist()
        step_loss = (1 - p.kd_ratio) * ce_loss + p.kd_ratio * kd_loss
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
        return {"step": self.global_step, "loss": step_loss, "ce_loss": ce_loss, "kd_loss": kd_loss, "lr": lr,
                "grad_norm": grad_norm, "num_tokens": num_input_tokens}

    def loss_sums(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE sum, KL(teacher || student) sum) of a batch over its labelled positions, float32. Packed rows also pass
        their position and document ids, to both models.

        With `chunked_loss` both models return their final hidden states and the two heads run inside the loss,
        `loss_chunk_size` tokens at a time, so the `[batch, seq, vocab]` logits never exist at once. When the
        student's lm_head is a LoRA target the loss is unchunked (the projection must go through the adapter).
        """
        p = self.params
        kwargs = {"position_ids": batch.get("position_ids"), "document_ids": batch.get("document_ids")}
        with torch.no_grad():
            teacher_hidden = self.teacher(batch["tokens"], return_hidden=True, **kwargs)
        if self.chunked_loss:
            hidden = self.model(batch["tokens"], return_hidden=True, **kwargs)
            return distillation_loss_sums(hidden, self.model.lm_head.weight, teacher_hidden,
                                          self.teacher.lm_head.weight, batch["labels"], chunk_size=p.loss_chunk_size,
                                          positions=batch["label_positions"])
        with torch.no_grad():
            teacher_logits = self.teacher.lm_head(teacher_hidden)
        return distillation_loss_sums_from_logits(self.model(batch["tokens"], **kwargs), teacher_logits,
                                                  batch["labels"])

    def evaluate(self) -> dict[str, float]:
        """The loss, its CE and KL parts per label token over the validation set (its first `max_eval_batches`
        batches), and the CE's perplexity."""
        p = self.params
        self.model.eval()
        ce_sum, kd_sum, num_label_tokens = 0.0, 0.0, 0
        with torch.no_grad():
            for index, batch in enumerate(self.val_dataloader):
                if p.max_eval_batches is not None and index >= p.max_eval_batches:
                    break
                batch = move_batch(batch, self.device)
                ce, kd = self.loss_sums(batch)
                ce_sum, kd_sum = ce_sum + ce.item(), kd_sum + kd.item()
                num_label_tokens += count_label_tokens(batch["labels"])
        self.model.train()
        ce_loss, kd_loss = ce_sum / max(num_label_tokens, 1), kd_sum / max(num_label_tokens, 1)
        return {"val_loss": (1 - p.kd_ratio) * ce_loss + p.kd_ratio * kd_loss, "val_ce_loss": ce_loss,
                "val_kd_loss": kd_loss, "val_perplexity": math.exp(ce_loss) if ce_loss < 700 else math.inf,
                "val_tokens": num_label_tokens}

    def save_checkpoint(self) -> Path:
        """`output_dir/step_<N>`: the student's Hugging Face layout (config.json, safetensors, tokenizer files;
        with LoRA the merged model, and the PEFT adapter in `adapter/`), written atomically, then `recipe_state.pt`
        (optimizer, LR schedule, RNG, data position, step, epoch) via a temporary file and a rename: a `step_<N>`
        with recipe_state.pt is complete. Keeps the newest `keep_last_n_checkpoints`. Saving the same step twice
        (a preemption right after a periodic save) writes nothing. The teacher is not saved: it did not change."""
        p = self.params
        out_dir = self.output_dir / f"step_{self.global_step}"
        if self.last_saved_step == self.global_step and out_dir.is_dir():
            return out_dir
        if self.lora:
            # Merged on the CPU a layer at a time: no second copy of the targeted weights on the accelerator.
            merged = merge_lora(self.model, device="cpu")
            save_hf_checkpoint(merged, out_dir, dtype=self.dtype, tokenizer_files=self.tokenizer.files)
            del merged
            save_peft_adapter(
                self.model, out_dir / ADAPTER_DIR_NAME, base_model_name_or_path=str(self.base_model_path),
                targets=p.lora_target_modules, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
                use_dora=p.use_dora,
            )
        else:
            save_hf_checkpoint(self.model, out_dir, dtype=self.dtype, tokenizer_files=self.tokenizer.files)
        save_recipe_state(out_dir, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                          dataloader_state=self.dataloader.state_dict(), global_step=self.global_step,
                          epoch=self.epoch, extra={"params": params_record(p, total_steps=self.total_steps)})
        self.last_saved_step, self.last_checkpoint = self.global_step, out_dir
        if p.keep_last_n_checkpoints is not None:
            prune_checkpoints(self.output_dir, p.keep_last_n_checkpoints, protect=out_dir)
        print(f"saved checkpoint to {out_dir}" + (f" (PEFT adapter in {out_dir / ADAPTER_DIR_NAME})" if self.lora
                                                  else ""), flush=True)
        return out_dir

    def cleanup(self) -> None:
        self.metric_logger.close()
        self.run_lock.release()


def report_dataset(field: str, dataset) -> None:
    """One line of counts (samples, tokens, truncated, dropped, bad rows skipped, cache), and the first skipped rows."""
    print(f"{field}: {dataset.summary()}", flush=True)
    for message in dataset.stats.get("skipped_examples", []):
        print(f"  skipped {message}", flush=True)


def recipe_main(params: KnowledgeDistillationParams) -> Path:
    """Run the whole recipe; returns the directory of the saved student checkpoint."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MytuneError("knowledge_distillation_single_device runs on one device; use "
                          "knowledge_distillation_distributed under torchrun")
    exit_with_launcher()  # under torchrun: stop (saving) when the launcher dies
    require_input_paths(params)  # hub dataset names (owner/name) are not missing paths
    recipe = KnowledgeDistillationRecipeSingleDevice(params)
    try:
        recipe.setup()
        recipe.train()
        out_dir = recipe.save_checkpoint()
        recipe.cleanup()
        print(run_summary("knowledge_distillation_single_device", recipe.global_step, recipe.last_logged, out_dir,
                          adapter=recipe.lora), flush=True)
    finally:
        recipe.run_lock.release()  # also on an error: the output_dir is free for the next run
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = TuneArgumentParser(KnowledgeDistillationParams, recipe=__file__)
    recipe_main(parser.parse_params(argv))


if __name__ == "__main__":
    run_or_exit(main, prog="knowledge_distillation_single_device")
