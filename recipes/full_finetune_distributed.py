"""Full fine-tuning sharded over several processes with FSDP2 (one per GPU, or several CPU processes).

    mytune --nproc_per_node 8 full_finetune_distributed --config llama3_1_8b --override checkpoint_dir=/models/Llama-3.1-8B
    mytune --nproc_per_node 2 full_finetune_distributed --config tiny_demo          # CPU, gloo
    mytune --nproc_per_node 8 full_finetune_distributed --config llama3_1_70b --override tensor_parallel_dim=8

The same recipe as `full_finetune_single_device`, adapted to FSDP2 (the duplication is on purpose: read or copy one
file). Differences: every rank builds the model on the meta device and `fully_shard`s each decoder layer and the root;
rank 0 reads the checkpoint and the weights are broadcast shard by shard; rank 0 tokenizes the data (into the on-disk
cache) before the other ranks load it; a `ResumableSampler` gives each rank its part of every global batch; the loss
of a step is normalised by the label tokens of the whole global batch, so the gradient equals the single-device
gradient of that batch; the validation loss is summed over all ranks; only rank 0 logs and writes the checkpoint
files, while every rank takes part in gathering the weights and the sharded optimizer state for it.

Tensor parallel (`tensor_parallel_dim` > 1, `mytune.training.tensor_parallel`): the processes form a (dp, tp) mesh of
world_size / tp data-parallel groups of tp neighbouring ranks. Within a group each decoder layer's matmuls are split
(attention heads and the MLP; `sequence_parallel` also splits the norms' activations along the sequence), and the
group's ranks read the same batch; FSDP shards over the dp dimension (over one rank when tp = world size: it still
keeps the float32 masters and the bf16 compute). Token counts and loss sums are all-reduced over all ranks and
divided by tp (each group counted once); gradients are scaled by the dp size. Checkpoints are gathered whole, so a
run saved at one tp resumes at another.

Checkpoints: `output_dir/step_<N>/` holds the Hugging Face files plus `recipe_state.pt` (the full, unsharded optimizer
state, LR schedule, RNG, data position, step and epoch), so `resume_from_checkpoint=latest` continues the run where it
stopped, also on another number of processes. The HF files hold the float32 master weights also with dtype=bf16
(as transformers' Trainer saves a mixed-precision run): rounding them to bf16 would drop the part of the fine-tune's
updates below bf16's resolution, and a resumed run would not continue from where it stopped. Load them in bf16 for
inference (`torch_dtype=torch.bfloat16`).
"""

import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mytune.checkpoint import load_hf_model, read_hf_model_args, save_hf_checkpoint
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
from mytune.tokenizers import load_tokenizer, write_tokenizer_files
from mytune.training import distributed
from mytune.training.device import move_batch, set_seed
from mytune.training.float8 import check_float8_supported, convert_to_float8
from mytune.training.layer_wrappers import (
    activation_offloading,
    apply_activation_checkpointing,
    compile_layers,
    use_activation_offloading,
)
from mytune.training.loss import (
    IGNORE_INDEX,
    chunked_cross_entropy_sum,
    count_label_tokens,
    cross_entropy_sum,
    label_positions,
)
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
from mytune.training.tensor_parallel import (
    apply_tensor_parallel,
    check_tensor_parallel,
    clip_grad_norm_,
    make_device_mesh,
    mesh_dim,
)
from recipes.params.full_finetune_distributed import FullFinetuneDistributedParams


class FullFinetuneRecipeDistributed:
    """load_checkpoint -> setup -> train -> save_checkpoint -> cleanup, on every rank."""

    def __init__(self, params: FullFinetuneDistributedParams):
        self.params = params
        self.dist = distributed.init_distributed(params.device)
        self.device = self.dist.device
        self.is_rank_zero = self.dist.is_rank_zero
        # The (dp, tp) mesh: tp = tensor_parallel_dim neighbouring ranks split each layer, FSDP shards over the dp
        # groups (at tp=1: one "dp" dimension, every rank). The data and the loss sums follow the dp rank and size.
        self.tp = params.tensor_parallel_dim
        with distributed.error_from_rank_zero():  # one line if tp does not divide the number of processes
            mesh = make_device_mesh(self.dist.world_size, self.tp, self.device.type, keep_dp=True)
        self.tp_mesh, self.dp_mesh = mesh_dim(mesh, "tp"), mesh_dim(mesh, "dp")
        self.dp_rank, self.dp_size = self.dp_mesh.get_local_rank(), self.dp_mesh.size()
        self.output_dir = Path(params.output_dir)
        self.global_step = 0
        self.last_logged: dict = {}  # rank 0's newest logged metrics, for the closing summary
        self.epoch = 0
        # Rank 0 decides where to resume from (None: a fresh run) and tells the others, so all ranks agree.
        # Rank 0 also holds the output_dir's lock until cleanup and refuses to mix with another run's step_<N>.
        self.run_lock = None

        def claim():
            self.run_lock, resume_dir = claim_output_dir(params.output_dir, params.resume_from_checkpoint,
                                                         overwrite=params.overwrite_output_dir)
            return resume_dir

        self.resume_dir = distributed.decided_by_rank_zero(claim)
        self.last_checkpoint = self.resume_dir  # the newest complete checkpoint, named when the loss turns nan
        self.last_saved_step = None
        self.preemption = StopSignals()  # SIGTERM or Ctrl-C -> a flag; installed while `train` runs
        self.stop_requested = False  # any rank signalled: set by train_step, the same on every rank
        set_seed(params.seed)  # the same seed on every rank: rank 0's random start and the data order

    def load_checkpoint(self) -> None:
        """The model sharded over the ranks, its weights read by rank 0 only (the tokenizer is loaded by `setup`).

        From the resumed `step_<N>`, from `checkpoint_dir`, or a seeded random `model`. Rank 0 holds the full float32 state dict on the CPU;
        the other ranks only learn the shapes (config.json / the builder). Weights stay float32 with dtype=bf16 too:
        the FSDP mixed-precision policy casts them for compute.
        """
        p = self.params
        full_state_dict = None
        source = self.resume_dir or p.checkpoint_dir
        if source:
            args = read_hf_model_args(source)  # config.json and generation_config.json, kept whole for the save
        else:
            # A fresh model sized to the tokenizer: the demo and tests start here, seeded by set_seed above.
            args = model_args(p.model)
            args.vocab_size = self.tokenizer.vocab_size
            args.bos_token_id, args.eos_token_id = self.tokenizer.bos_id, self.tokenizer.eos_id
        if self.tokenizer.vocab_size > args.vocab_size:
            raise MytuneError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's embedding has only "
                f"{args.vocab_size}: tokenizer_path does not belong to this checkpoint"
            )
        with distributed.error_from_rank_zero():  # one line if tp does not divide the heads or the MLP
            check_tensor_parallel(args, self.tp)
        if self.is_rank_zero:
            full_state_dict = (load_hf_model(source, device="cpu", dtype=torch.float32) if source
                               else TransformerDecoder(args)).state_dict()
        with torch.device("meta"):
            self.model = TransformerDecoder(args)
        # Before sharding; none of these changes parameter names or state-dict keys.
        if p.float8:
            check_float8_supported(self.device)
            convert_to_float8(self.model)
        # Tensor parallel before the wrappers and FSDP: each layer's weights become DTensors split over the tp ranks
        # (nothing changes at tp=1), which FSDP then shards again over the dp ranks.
        apply_tensor_parallel(self.model, self.tp_mesh, sequence_parallel=p.sequence_parallel)
        if p.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if p.compile:
            compile_layers(self.model)
        distributed.shard_model(self.model, bf16=p.dtype == "bf16", cpu_offload=p.cpu_offload,
                               reshard_after_forward=p.fsdp_reshard_after_forward, mesh=self.dp_mesh)
        distributed.load_full_state_dict(self.model, full_state_dict, self.device)
        del full_state_dict

    def setup(self) -> None:
        p = self.params
        # Tokenizer and data before the model: a bad dataset row fails in seconds, not after the weights are read.
        self.tokenizer = load_tokenizer(p.tokenizer_path or p.checkpoint_dir)
        self.setup_data()
        self.load_checkpoint()
        self.model.train()
        self.model.attention_backend = p.attention_backend  # "auto": flex for packed rows on CUDA
        self.offload_activations = use_activation_offloading(p.activation_offloading, self.device)

        self.steps_per_epoch = len(self.dataloader) // p.gradient_accumulation_steps
        if p.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, p.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise MytuneError(
                f"dataset_path has {len(self.dataloader.dataset)} {'packed rows' if p.packed else 'samples'} for "
                f"training, fewer than one optimizer step needs (batch_size * gradient_accumulation_steps * "
                f"data-parallel size = {p.batch_size * p.gradient_accumulation_steps * self.dp_size})"
            )
        self.total_steps = self.steps_per_epoch * p.epochs

        self.optimizer = build_optimizer(self.model.parameters(), p.optimizer, lr=p.lr, weight_decay=p.weight_decay,
                                         device=self.device)  # not fused with cpu_offload: parameters on the CPU
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, schedule=p.lr_scheduler, warmup_steps=p.warmup_steps, total_steps=self.total_steps
        )
        if self.resume_dir is not None:
            # Every rank (a collective): rank 0 reads the file and scatters the optimizer state into the shards.
            # Last: the RNG streams are set back to where the interrupted run was after its step.
            state = load_recipe_state(self.resume_dir, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                                      model=self.model)
            self.global_step, self.epoch = state.global_step, state.epoch
            self.dataloader.load_state_dict(state.dataloader_state)
            self.last_saved_step = self.global_step
            # What the config and command line say now beats the checkpoint (lr, weight decay, schedule).
            changed = apply_resume_precedence(self.optimizer, self.lr_scheduler, saved=state.extra.get("params"),
                                              current=params_record(p, total_steps=self.total_steps),
                                              checkpoint_dir=self.resume_dir, global_step=self.global_step)
            if self.is_rank_zero:
                print(f"resumed from {self.resume_dir} at step {self.global_step}", flush=True)
                if changed:
                    print(f"changed since the checkpoint (the new values apply): {', '.join(changed)}", flush=True)
                if self.global_step == self.total_steps:
                    print(f"{self.resume_dir} is the last step ({self.total_steps}): nothing left to train", flush=True)
        if self.is_rank_zero:
            truncate_metrics(self.output_dir / "metrics.jsonl", self.global_step)  # one row per step after a resume
            self.metric_logger = build_metric_loggers(self.output_dir, p.metric_loggers, run_name=self.output_dir.name,
                                                      config=dataclasses.asdict(p))
            n_params = sum(t.numel() for t in self.model.parameters())  # DTensor numel is the full size
            layout = (f" (FSDP over {self.dp_size} x tensor parallel over {self.tp}"
                      f"{', sequence parallel' if p.sequence_parallel else ''})" if self.tp > 1 else "")
            print(
                f"full_finetune_distributed: {n_params / 1e6:.1f}M params sharded over {self.dist.world_size} "
                f"process(es){layout} on {self.device.type} in {p.dtype}, {self.total_steps} steps of "
                f"{p.batch_size * p.gradient_accumulation_steps * self.dp_size} "
                f"{'packed rows' if p.packed else 'samples'} with {p.optimizer}",
                flush=True,
            )

    def setup_data(self) -> None:
        """Tokenized datasets, a validation split, and loaders that give each rank its own shard.

        Rank 0 tokenizes first and writes the on-disk cache; the other ranks then load it from there instead of
        tokenizing again (with dataset_cache_dir=off they tokenize after rank 0). A bad row is reported once, by rank 0.
        Items are samples, or packed rows of several samples when `packed`; batches hold `tokens` and `labels` (and
        `position_ids` / `document_ids` when packed). The sampler's state (epoch, samples consumed by all ranks) is
        what a checkpoint needs to resume the data where it stopped: `self.dataloader.state_dict()`.
        """
        p = self.params
        cache_dir = None if p.dataset_cache_dir == "off" else (p.dataset_cache_dir or default_cache_dir())
        if cache_dir is not None and self.is_rank_zero:
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

        def build_all():
            train = build_dataset_mix(build, p.dataset_path, weights=p.dataset_weights, formats=p.dataset_formats,
                                      column_maps=p.column_maps)
            return train, (build(p.dataset_val) if p.dataset_val else None)

        error = None
        if self.is_rank_zero:
            try:
                dataset, val_dataset = build_all()
            except MytuneError as err:
                error = err
        (failed,) = distributed.all_reduce_sum([float(error is not None)], self.device)  # the barrier: rank 0 is done
        if error is not None:
            raise error
        if failed:  # rank 0 reports the error (one line for the whole job) and exits; torchrun then stops this rank
            time.sleep(30)  # rather than exit first: torchrun would then report this rank and not rank 0's error
            raise SystemExit(2)
        if not self.is_rank_zero:
            dataset, val_dataset = build_all()  # from the cache rank 0 wrote
        if self.is_rank_zero:
            report_dataset("dataset_path", dataset)
            if val_dataset is not None:
                report_dataset("dataset_val", val_dataset)
        if val_dataset is None and p.val_fraction > 0:
            dataset, val_dataset = split_validation(dataset, p.val_fraction, seed=p.seed)  # the same split on all ranks
            if self.is_rank_zero:
                print(f"validation: {val_dataset.num_samples} of the samples (val_fraction={p.val_fraction}), "
                      f"training: {dataset.num_samples}", flush=True)

        # Sequence parallel cuts the sequence in tp equal parts: each batch is padded to a multiple of tp.
        collate = partial(padded_collate, pad_id=self.tokenizer.pad_id,
                          pad_to_multiple_of=self.tp if p.sequence_parallel else 1)
        # Data-parallel rank d takes positions d, d + dp, d + 2 * dp, ... of each epoch's seeded order (the same on
        # every rank); the tp ranks of one group share a dp rank and so read the same batches.
        sampler = ResumableSampler(dataset, rank=self.dp_rank, world_size=self.dp_size, shuffle=p.shuffle,
                                   seed=p.seed)
        # Pinned on CUDA: move_batch's non-blocking copies then overlap the host's work.
        pin = self.device.type == "cuda"
        self.dataloader = ResumableDataLoader(dataset, batch_size=p.batch_size, sampler=sampler, collate_fn=collate,
                                              pin_memory=pin)
        self.val_dataloader = None
        if val_dataset is not None:
            # A plain DataLoader in a fixed order: every validation starts at the first batch. Without drop_last the
            # sampler wraps around so that every rank runs the same number of forwards (FSDP needs that); `evaluate`
            # leaves the repeated samples out of the loss.
            val_sampler = ResumableSampler(val_dataset, rank=self.dp_rank, world_size=self.dp_size,
                                           shuffle=False, drop_last=False)
            self.val_dataloader = DataLoader(val_dataset, batch_size=p.batch_size, sampler=val_sampler,
                                             collate_fn=collate, pin_memory=pin)

    def train(self) -> None:
        """Optimizer steps from `global_step` (0, or where a resumed run stopped) to `total_steps`, saving a
        checkpoint every `save_every_n_steps`. On SIGTERM or Ctrl-C to any rank (preemption) every rank stops after the
        same step, they save a checkpoint together and return early: `recipe_main` then finds it saved, exit 0."""
        p = self.params
        # A resumed run starts in the epoch and at the step where it stopped; its data loader continues there too.
        first_epoch, steps_done = divmod(self.global_step, self.steps_per_epoch)
        with (tqdm(total=self.total_steps, initial=self.global_step, desc="train", dynamic_ncols=True,
                   disable=not self.is_rank_zero) as progress,
              self.preemption,
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
                    tokens_per_s = metrics["num_tokens"] / seconds  # all dp ranks' tokens: the job's throughput
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens_per_s:.0f}")
                    last_step = self.global_step == self.total_steps
                    evaluate = self.val_dataloader is not None and (
                        last_step or (p.eval_every_n_steps > 0 and self.global_step % p.eval_every_n_steps == 0)
                    )
                    metrics.update(epoch=epoch, tokens_per_s=tokens_per_s, peak_memory_gib=peak_memory_gib(self.device))
                    if evaluate:  # on every rank: the sharded forwards are collectives
                        metrics.update(self.evaluate())
                        if self.is_rank_zero:
                            progress.write(f"step {self.global_step}: val_loss {metrics['val_loss']:.4f}, "
                                           f"val_perplexity {metrics['val_perplexity']:.2f}")
                    if self.is_rank_zero and (self.global_step % p.log_every_n_steps == 0 or last_step or evaluate):
                        self.metric_logger.log(metrics)
                        self.last_logged = metrics  # for the run's closing summary
                    if self.stop_requested:  # the same on every rank: train_step's loss all-reduce carried the flag
                        if self.is_rank_zero:
                            progress.write(f"preemption signal at step {self.global_step}: saving a checkpoint and "
                                           f"stopping (resume with resume_from_checkpoint=latest)")
                        self.save_checkpoint()
                        return
                    if not last_step and p.save_every_n_steps > 0 and self.global_step % p.save_every_n_steps == 0:
                        self.save_checkpoint()

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict:
        """One optimizer step over this rank's `micro_batches` (gradient accumulation); returns its metrics, which
        are the same on every rank (loss and token counts summed over the ranks)."""
        p = self.params
        # Normalise by the label tokens of the whole optimizer step on ALL ranks, not per rank or micro-batch. The
        # sums run over every rank, and the tp ranks of a group hold the same batch: divided by tp, each counts once.
        local_label_tokens = sum(count_label_tokens(b["labels"]) for b in micro_batches)
        local_input_tokens = sum(int(b["seq_lens"].sum()) for b in micro_batches)  # real tokens, no padding
        num_label_tokens, num_input_tokens = (total / self.tp for total in distributed.all_reduce_sum(
            [local_label_tokens, local_input_tokens], self.device))
        micro_losses = []  # read after the loop: one device sync per step, not one per micro-batch
        for batch in micro_batches:
            batch = move_batch(batch, self.device)
            with activation_offloading(self.offload_activations):  # the forward only: the backward brings them back
                loss = self.loss_sum(batch) / max(num_label_tokens, 1)
            # FSDP averages gradients over the dp ranks; scaling by their number turns that mean into the sum, so
            # the gradient is that of sum(token losses of the global batch) / num_label_tokens (the tp ranks of a
            # group compute one gradient together: DTensor sums the parts, nothing to scale).
            (loss * self.dp_size).backward()
            micro_losses.append(loss.detach())
        local_loss = sum(loss.item() for loss in micro_losses)
        # The preemption flag rides on the loss all-reduce the step does anyway: every rank learns whether any rank
        # was signalled (SIGTERM) without a collective of its own, so all stop after the same step.
        loss_sum, signalled = distributed.all_reduce_sum([local_loss, float(self.preemption.should_stop)], self.device)
        step_loss = loss_sum / self.tp  # each tp group's loss counted once
        self.stop_requested = signalled > 0
        lr = float(self.lr_scheduler.get_last_lr()[0])  # torchao's low-bit AdamW keeps lr as a tensor
        # The same value on every rank, so all ranks raise together; before the optimizer step.
        check_finite(step_loss, self.global_step + 1, last_checkpoint=self.last_checkpoint, lr=lr, model=self.model)
        grad_norm = None
        if p.max_grad_norm is not None:
            # Under TP the gradients are DTensors on two meshes (dp x tp, and dp), which torch's own clip cannot mix.
            clip = clip_grad_norm_ if self.tp > 1 else torch.nn.utils.clip_grad_norm_
            norm = clip(self.model.parameters(), p.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.global_step += 1
        return {"step": self.global_step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                "num_tokens": int(num_input_tokens)}

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token loss of this rank's batch (float32). Packed rows also pass position and document ids.

        With `chunked_loss` the model returns its final hidden states and the output projection runs inside the
        loss, `loss_chunk_size` tokens at a time. FSDP keeps the root's parameters (the head among them) gathered
        from the root's forward until its backward, so `lm_head.weight` is the full weight here.
        """
        p = self.params
        kwargs = {"position_ids": batch.get("position_ids"), "document_ids": batch.get("document_ids")}
        if p.chunked_loss:
            hidden = self.model(batch["tokens"], return_hidden=True, **kwargs)
            return chunked_cross_entropy_sum(hidden, self.model.lm_head.weight, batch["labels"],
                                             chunk_size=p.loss_chunk_size, positions=batch["label_positions"],
                                             compile=p.compile)
        return cross_entropy_sum(self.model(batch["tokens"], **kwargs), batch["labels"])

    def evaluate(self) -> dict[str, float]:
        """Mean token loss over the validation set (its first `max_eval_batches` batches per rank) and its perplexity.

        Each dp rank sums the loss of its shard; the sums and label-token counts are added over all ranks (each tp
        group counted once).
        """
        p = self.params
        dp_size, num_items = self.dp_size, len(self.val_dataloader.dataset)
        self.model.eval()
        loss_sum, num_label_tokens = 0.0, 0
        with torch.no_grad():
            for index, batch in enumerate(self.val_dataloader):
                if p.max_eval_batches is not None and index >= p.max_eval_batches:
                    break
                # This dp rank's j-th item is position dp_rank + j * dp_size of the validation order; positions
                # past its end are the wrap-around repeats: no loss on them.
                first = index * p.batch_size
                positions = self.dp_rank + dp_size * torch.arange(first, first + len(batch["labels"]))
                batch["labels"][positions >= num_items] = IGNORE_INDEX
                batch["label_positions"] = label_positions(batch["labels"])
                batch = move_batch(batch, self.device)
                loss_sum += self.loss_sum(batch).item()
                num_label_tokens += count_label_tokens(batch["labels"])
        self.model.train()
        loss_sum, num_label_tokens = (total / self.tp for total in distributed.all_reduce_sum(
            [loss_sum, num_label_tokens], self.device))
        val_loss = loss_sum / max(num_label_tokens, 1)
        return {"val_loss": val_loss, "val_perplexity": math.exp(val_loss) if val_loss < 700 else math.inf,
                "val_tokens": int(num_label_tokens)}

    def save_checkpoint(self) -> Path:
        """`output_dir/step_<N>`: every rank gathers the weights and rank 0 writes the Hugging Face layout
        (atomically); then every rank gathers the sharded optimizer state and rank 0 writes `recipe_state.pt` (via a
        temporary file and a rename: a `step_<N>` with recipe_state.pt is complete) and keeps the newest
        `keep_last_n_checkpoints`. Saving the same step twice (a preemption right after a periodic save) writes nothing."""
        p = self.params
        out_dir = self.output_dir / f"step_{self.global_step}"
        if self.last_saved_step == self.global_step:
            return out_dir
        full_model = distributed.gather_full_model(self.model)
        if self.is_rank_zero:
            save_hf_checkpoint(full_model, out_dir, dtype=torch.float32)  # the master weights, exactly
            write_tokenizer_files(self.tokenizer, out_dir)
        del full_model
        save_recipe_state(out_dir, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, model=self.model,
                          dataloader_state=self.dataloader.state_dict(), global_step=self.global_step,
                          epoch=self.epoch, extra={"params": params_record(p, total_steps=self.total_steps)})
        self.last_saved_step, self.last_checkpoint = self.global_step, out_dir
        if self.is_rank_zero:
            if p.keep_last_n_checkpoints is not None:
                prune_checkpoints(self.output_dir, p.keep_last_n_checkpoints, protect=out_dir)
            print(f"saved checkpoint to {out_dir}", flush=True)
        distributed.barrier()  # no rank returns before the checkpoint exists
        return out_dir

    def cleanup(self) -> None:
        if self.is_rank_zero:
            self.metric_logger.close()
            self.run_lock.release()
        distributed.destroy_distributed()


def report_dataset(field: str, dataset) -> None:
    """One line of counts (samples, tokens, truncated, dropped, bad rows skipped, cache), and the first skipped rows."""
    print(f"{field}: {dataset.summary()}", flush=True)
    for message in dataset.stats.get("skipped_examples", []):
        print(f"  skipped {message}", flush=True)



def recipe_main(params: FullFinetuneDistributedParams) -> Path:
    """Run the whole recipe on this rank; returns the directory of the saved checkpoint."""
    exit_with_launcher()  # under torchrun: stop (saving) when the launcher dies
    require_input_paths(params)  # hub dataset names (owner/name) are not missing paths
    recipe = None
    try:
        recipe = FullFinetuneRecipeDistributed(params)
        recipe.setup()
        recipe.train()
        out_dir = recipe.save_checkpoint()
    except MytuneError:
        distributed.destroy_distributed()  # leave the group before exiting: a live gloo group can abort the exit
        raise
    finally:
        if recipe is not None and recipe.run_lock is not None:
            recipe.run_lock.release()  # also on an error: the output_dir is free for the next run
    recipe.cleanup()
    if recipe.is_rank_zero:
        print(run_summary("full_finetune_distributed", recipe.global_step, recipe.last_logged, out_dir, adapter=False),
              flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = TuneArgumentParser(FullFinetuneDistributedParams, recipe=__file__)
    recipe_main(parser.parse_params(argv))


if __name__ == "__main__":
    run_or_exit(main, prog="full_finetune_distributed")
