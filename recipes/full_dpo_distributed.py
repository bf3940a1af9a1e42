"""Full preference tuning (DPO, IPO, SimPO) sharded over several processes with FSDP2 (one per GPU, or CPU processes).

    mytune --nproc_per_node 8 full_dpo_distributed --config llama3_1_8b --override checkpoint_dir=/models/Llama-3.1-8B
    mytune --nproc_per_node 2 full_dpo_distributed --config tiny_demo          # CPU, gloo
    mytune full_dpo_distributed --config tiny_demo                             # one process, no torchrun
    mytune --nproc_per_node 8 full_dpo_distributed --config llama3_1_70b --override tensor_parallel_dim=8

`full_finetune_distributed` with preference pairs and a preference loss (the duplication is on purpose: read or copy
one file). Every weight of the policy trains; the reference is a second copy of the starting weights (the same
`checkpoint_dir`, or the same seeded random start for `model=...`), sharded the same way, frozen, in eval mode and
run under no_grad: stored in bf16 when dtype=bf16 (it is never updated, so it needs no float32 master copy: the
compute sees the very same bf16 weights as the policy's first step). With `precompute_reference_logps` the reference
runs once over the data at setup and its log-probs are cached on disk with the tokenized data
(`mytune.training.reference_logps`); simpo needs no reference. Neither builds the second copy.

Each micro-batch is one forward of [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] (`preference_collate`); the
log-probs of the labelled (response) tokens are summed per sequence (`sequence_logps`, chunked: no [tokens, vocab]
float32 tensor is kept) and the preference loss is TRL's (`mytune.training.preference`). The loss of an optimizer step
is the mean over the pairs of the whole global batch (all micro-batches, all ranks), so its gradient equals that of
one process holding the whole batch; the logged rewards and log-probs are means over the same pairs.

Tensor parallel (`tensor_parallel_dim` > 1) is `full_finetune_distributed`'s: a (dp, tp) mesh, each decoder layer
split over the tp ranks of a group, FSDP over dp; the frozen reference gets the very same layout as the policy. The
tp ranks of a group read the same pairs (data split by the dp rank, also for `precompute_reference_logps`: each tp
group computes one block together); the pair counts and metric sums are all-reduced over all ranks and divided by tp.

Checkpoints: as `full_finetune_distributed` (`output_dir/step_<N>/` = the policy's HF files in float32 +
`recipe_state.pt`); a resumed run rebuilds the reference from `checkpoint_dir` (or the seed), never from the step.
"""

import dataclasses
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mytune.checkpoint import load_hf_model, read_hf_model_args, save_hf_checkpoint
from mytune.config import TuneArgumentParser, require_input_paths
from mytune.data import ResumableDataLoader, ResumableSampler, default_cache_dir, split_validation
from mytune.data.preference import build_preference_dataset, preference_collate
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
from mytune.training.lifetime import StopSignals, exit_with_launcher
from mytune.training.lr_schedule import build_lr_scheduler
from mytune.training.metrics import build_metric_loggers, run_summary, truncate_metrics
from mytune.training.optim import build_optimizer
from mytune.training.preference import (
    METRIC_NAMES,
    PreferenceLoss,
    preference_loss,
    preference_metrics,
    sequence_logps,
    sequence_logps_from_logits,
)
from mytune.training.profiling import maybe_profile, peak_memory_gib
from mytune.training.reference_logps import (
    WithReferenceLogps,
    checkpoint_identity,
    collate_with_reference,
    reference_logps_for,
)
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
from recipes.params.full_dpo_distributed import FullDPODistributedParams


class FullDPORecipeDistributed:
    """load_checkpoint -> setup -> train -> save_checkpoint -> cleanup, on every rank."""

    def __init__(self, params: FullDPODistributedParams):
        self.params = params
        self.dist = distributed.init_distributed(params.device)
        self.device = self.dist.device
        self.is_rank_zero = self.dist.is_rank_zero
        # The (dp, tp) mesh: tp = tensor_parallel_dim neighbouring ranks split each layer, FSDP shards over the dp
        # groups (at tp=1: one "dp" dimension, every rank). The data and the metric sums follow the dp rank and size.
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
        self.reference = None  # the frozen reference copy; None for simpo and precomputed reference log-probs
        set_seed(params.seed)  # the same seed on every rank: the data order and dropout

    def load_checkpoint(self) -> None:
        """The policy and (when one is needed) the reference, sharded over the ranks; weights read by rank 0 only.

        The policy starts from the resumed `step_<N>`, from `checkpoint_dir`, or a seeded random `model`; the
        reference always from the run's start (`checkpoint_dir` or the same seeded random model). Rank 0 holds the
        full float32 state dict on the CPU (one at a time); the other ranks only learn the shapes. The policy's
        weights stay float32 with dtype=bf16 too (the FSDP mixed-precision policy casts them for compute).
        """
        p = self.params
        start_args = read_hf_model_args(p.checkpoint_dir) if p.checkpoint_dir else self.random_start_args()
        if self.tokenizer.vocab_size > start_args.vocab_size:
            raise MytuneError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's embedding has only "
                f"{start_args.vocab_size}: tokenizer_path does not belong to this checkpoint"
            )
        with distributed.error_from_rank_zero():  # one line if tp does not divide the heads or the MLP
            check_tensor_parallel(start_args, self.tp)
        start = None  # rank 0: the run's starting weights, for the reference and (fresh runs) the policy
        if self.is_rank_zero and (self.resume_dir is None or self.needs_reference_model()):
            start = self.start_state_dict(start_args)
        if self.needs_reference_model():
            self.reference = self.build_reference(start_args, start)
        if self.resume_dir is None:
            args, full_state_dict = start_args, start
        else:
            del start
            args = read_hf_model_args(self.resume_dir)  # the step's config.json, kept whole for the next save
            full_state_dict = (load_hf_model(self.resume_dir, device="cpu", dtype=torch.float32).state_dict()
                               if self.is_rank_zero else None)
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

    def random_start_args(self):
        """The named builder's sizes, with the tokenizer's vocabulary and special ids: the demo and tests start here."""
        args = model_args(self.params.model)
        args.vocab_size = self.tokenizer.vocab_size
        args.bos_token_id, args.eos_token_id = self.tokenizer.bos_id, self.tokenizer.eos_id
        return args

    def start_state_dict(self, args) -> dict[str, torch.Tensor]:
        """Rank 0: the float32 weights the run starts from, on the CPU: `checkpoint_dir`, or a random model drawn from
        `seed` alone (in a forked RNG), so a resumed run rebuilds the very same reference."""
        p = self.params
        if p.checkpoint_dir:
            return load_hf_model(p.checkpoint_dir, device="cpu", dtype=torch.float32).state_dict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            return TransformerDecoder(args).state_dict()

    def needs_reference_model(self) -> bool:
        """Whether the run holds the reference copy while training: not for simpo (reference-free), nor with
        precomputed log-probs (`precompute_reference_logps` builds it for the precomputation alone, on a cache miss)."""
        return self.params.loss_type != "simpo" and not self.params.precompute_reference_logps

    def build_reference(self, args, start: dict[str, torch.Tensor] | None) -> TransformerDecoder:
        """A frozen, sharded copy of `start` (rank 0's state dict) in eval mode: stored in bf16 with dtype=bf16 (no
        mixed-precision cast then: the compute sees the same bf16 weights as the policy's), float32 otherwise."""
        p = self.params
        dtype = torch.bfloat16 if p.dtype == "bf16" else torch.float32
        with torch.device("meta"):
            reference = TransformerDecoder(args).to(dtype)
        reference.requires_grad_(False)
        # The policy's layout: the same tensor-parallel split, FSDP over the same dp ranks.
        apply_tensor_parallel(reference, self.tp_mesh, sequence_parallel=p.sequence_parallel)
        distributed.shard_model(reference, bf16=False, cpu_offload=p.cpu_offload, mesh=self.dp_mesh)
        if start is not None and dtype != torch.float32:
            start = {key: value.to(dtype) for key, value in start.items()}
        distributed.load_full_state_dict(reference, start, self.device)
        reference.eval()
        reference.attention_backend = p.attention_backend
        return reference

    def setup(self) -> None:
        p = self.params
        # Tokenizer and data before the model: a bad dataset row fails in seconds, not after the weights are read.
        self.tokenizer = load_tokenizer(p.tokenizer_path or p.checkpoint_dir)
        self.setup_data()
        self.load_checkpoint()
        if p.precompute_reference_logps and p.loss_type != "simpo":
            self.precompute_reference_logps()
        self.setup_loaders()
        self.model.train()
        self.model.attention_backend = p.attention_backend
        self.offload_activations = use_activation_offloading(p.activation_offloading, self.device)

        self.steps_per_epoch = len(self.dataloader) // p.gradient_accumulation_steps
        if p.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, p.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise MytuneError(
                f"dataset_path has {len(self.dataloader.dataset)} pairs for training, fewer than one optimizer step "
                f"needs (batch_size * gradient_accumulation_steps * data-parallel size = "
                f"{p.batch_size * p.gradient_accumulation_steps * self.dp_size})"
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
            if p.loss_type == "simpo":
                reference = "no reference (simpo)"
            elif p.precompute_reference_logps:
                reference = "precomputed reference log-probs"
            else:
                reference = "a frozen sharded reference"
            layout = (f" (FSDP over {self.dp_size} x tensor parallel over {self.tp}"
                      f"{', sequence parallel' if p.sequence_parallel else ''})" if self.tp > 1 else "")
            print(
                f"full_dpo_distributed: {p.loss_type} on {n_params / 1e6:.1f}M params sharded over "
                f"{self.dist.world_size} process(es){layout} on {self.device.type} in {p.dtype}, {reference}, "
                f"{self.total_steps} steps of {p.batch_size * p.gradient_accumulation_steps * self.dp_size} "
                f"pairs with {p.optimizer}",
                flush=True,
            )

    def setup_data(self) -> None:
        """Tokenized preference pairs and a validation split (`self.dataset`, `self.val_dataset`).

        Rank 0 tokenizes first and writes the on-disk cache; the other ranks then load it from there instead of
        tokenizing again (with dataset_cache_dir=off they tokenize after rank 0). A bad row is reported once, by rank 0.
        """
        p = self.params
        self.cache_dir = None if p.dataset_cache_dir == "off" else (p.dataset_cache_dir or default_cache_dir())
        if self.cache_dir is not None and self.is_rank_zero:
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

        def build_all():
            return build(p.dataset_path), (build(p.dataset_val) if p.dataset_val else None)

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
                print(f"validation: {len(val_dataset)} of the pairs (val_fraction={p.val_fraction}), "
                      f"training: {len(dataset)}", flush=True)
        self.dataset, self.val_dataset = dataset, val_dataset

    def precompute_reference_logps(self) -> None:
        """The reference's log-probs of every training (and validation) pair, once: read from the cache next to the
        tokenized data, or computed by a temporary sharded reference (built only then, freed after) and cached.

        The cache key is the pairs' tokens with the reference's identity: its checkpoint files' bytes (hashed by rank
        0 alone) or the random start's builder and seed, and the dtype. Every rank ends with the whole table.
        """
        p = self.params
        if p.checkpoint_dir:
            start = {"checkpoint": distributed.decided_by_rank_zero(lambda: checkpoint_identity(p.checkpoint_dir))}
        else:
            start = {"model": p.model, "seed": p.seed, "vocab_size": self.tokenizer.vocab_size}
        identity = {**start, "dtype": p.dtype, "reference": "full copy"}

        def logps_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            if self.reference is None:  # on a cache miss only; every rank gets here together (a collective)
                args = read_hf_model_args(p.checkpoint_dir) if p.checkpoint_dir else self.random_start_args()
                self.reference = self.build_reference(args, self.start_state_dict(args) if self.is_rank_zero else None)
            return self.reference_logps(batch)

        compute = partial(reference_logps_for, logps_fn=logps_fn, cache_dir=self.cache_dir, model_identity=identity,
                          batch_size=p.batch_size, collate=self.pair_collate, device=self.device,
                          rank=self.dist.rank, world_size=self.dist.world_size, group=self.dp_mesh.get_group())
        self.dataset = WithReferenceLogps(self.dataset, compute(self.dataset, name="dataset_path"))
        if self.val_dataset is not None:
            self.val_dataset = WithReferenceLogps(self.val_dataset, compute(self.val_dataset, name="validation"))
        self.reference = None  # its memory is the policy's again

    def setup_loaders(self) -> None:
        """Loaders that give each rank its own shard of every global batch, and a fixed-order validation loader.

        Batches are `preference_collate`'s: rows [:B] chosen, [B:] rejected. The sampler's state (epoch, pairs
        consumed by all ranks) is what a checkpoint needs to resume the data where it stopped.
        """
        p = self.params
        dataset, val_dataset = self.dataset, self.val_dataset
        # Precomputed reference log-probs, when the items carry them, become the batch's reference_*_logps.
        collate = partial(collate_with_reference, collate=self.pair_collate)
        # Data-parallel rank d takes positions d, d + dp, d + 2 * dp, ... of each epoch's seeded order (the same on
        # every rank); the tp ranks of one group share a dp rank and so read the same pairs.
        sampler = ResumableSampler(dataset, rank=self.dp_rank, world_size=self.dp_size, shuffle=p.shuffle,
                                   seed=p.seed)
        pin = self.device.type == "cuda"  # move_batch's non-blocking copies then overlap the host's work
        self.dataloader = ResumableDataLoader(dataset, batch_size=p.batch_size, sampler=sampler, collate_fn=collate,
                                              pin_memory=pin)
        self.val_dataloader = None
        if val_dataset is not None:
            # A plain DataLoader in a fixed order: every validation starts at the first batch. Without drop_last the
            # sampler wraps around so that every rank runs the same number of forwards (FSDP needs that); `evaluate`
            # leaves the repeated pairs out of the metrics.
            val_sampler = ResumableSampler(val_dataset, rank=self.dp_rank, world_size=self.dp_size,
                                           shuffle=False, drop_last=False)
            self.val_dataloader = DataLoader(val_dataset, batch_size=p.batch_size, sampler=val_sampler,
                                             collate_fn=collate, pin_memory=pin)

    def pair_collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """`preference_collate`, its sequence padded to a multiple of tp under sequence parallel (which cuts it in
        tp equal parts)."""
        return preference_collate(items, pad_id=self.tokenizer.pad_id,
                                  pad_to_multiple_of=self.tp if self.params.sequence_parallel else 1)

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
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
                    last_step = self.global_step == self.total_steps
                    evaluate = self.val_dataloader is not None and (
                        last_step or (p.eval_every_n_steps > 0 and self.global_step % p.eval_every_n_steps == 0)
                    )
                    metrics.update(epoch=epoch, tokens_per_s=tokens_per_s, peak_memory_gib=peak_memory_gib(self.device))
                    if evaluate:  # on every rank: the sharded forwards are collectives
                        metrics.update(self.evaluate())
                        if self.is_rank_zero:
                            progress.write(f"step {self.global_step}: val_loss {metrics['val_loss']:.4f}, "
                                           f"val_rewards/accuracies {metrics['val_rewards/accuracies']:.3f}")
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
        are the same on every rank (means over all the step's pairs on all ranks)."""
        p = self.params
        # The loss is the mean over the pairs of the whole optimizer step on ALL ranks, not per rank or micro-batch.
        # The sums run over every rank, and the tp ranks of a group hold the same pairs: divided by tp, each counts
        # once.
        local_pairs = sum(len(b["tokens"]) // 2 for b in micro_batches)
        local_input_tokens = sum(int(b["seq_lens"].sum()) for b in micro_batches)  # real tokens, no padding
        num_pairs, num_input_tokens = (total / self.tp for total in distributed.all_reduce_sum(
            [local_pairs, local_input_tokens], self.device))
        outputs = []  # detached; read after the loop: one device sync per step, not one per micro-batch
        for batch in micro_batches:
            batch = move_batch(batch, self.device)
            reference_chosen, reference_rejected = self.reference_logps(batch)
            with activation_offloading(self.offload_activations):  # the forward only: the backward brings them back
                out, chosen, rejected = self.pair_loss(self.model, batch, reference_chosen, reference_rejected)
                loss = out.losses.sum() / num_pairs
            # FSDP averages gradients over the dp ranks; scaling by their number turns that mean into the sum, so
            # the gradient is that of sum(pair losses of the global batch) / num_pairs (the tp ranks of a group
            # compute one gradient together: DTensor sums the parts, nothing to scale).
            (loss * self.dp_size).backward()
            outputs.append((detached(out), chosen.detach(), rejected.detach()))
        local = step_metric_sums(outputs)  # sums over this rank's pairs
        # The preemption flag rides on the metrics' all-reduce the step does anyway: every rank learns whether any
        # rank was signalled (SIGTERM) without a collective of its own, so all stop after the same step.
        names = sorted(local)
        *sums, signalled = distributed.all_reduce_sum([local[name] for name in names] +
                                                      [float(self.preemption.should_stop)], self.device)
        self.stop_requested = signalled > 0
        metrics = {name: value / self.tp / max(num_pairs, 1) for name, value in zip(names, sums)}
        lr = float(self.lr_scheduler.get_last_lr()[0])  # torchao's low-bit AdamW keeps lr as a tensor
        # The same value on every rank, so all ranks raise together; before the optimizer step.
        check_finite(metrics["loss"], self.global_step + 1, last_checkpoint=self.last_checkpoint, lr=lr,
                     model=self.model)
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
        return {"step": self.global_step, **metrics, "lr": lr, "grad_norm": grad_norm,
                "num_tokens": int(num_input_tokens)}

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The reference's summed log-probs of the batch's chosen and rejected responses (float32 [B] each), or
        (None, None) for simpo. From the frozen copy under no_grad, or precomputed (`precompute_reference_logps`)."""
        if self.params.loss_type == "simpo":
            return None, None
        if "reference_chosen_logps" in batch:
            return batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        with torch.no_grad():
            logps, _ = self.sequence_logps(self.reference, batch)
        distributed.reshard(self.reference)  # no backward comes: free the root's and last layer's gathered weights
        return logps.chunk(2)

    def pair_loss(self, model: TransformerDecoder, batch: dict[str, torch.Tensor], reference_chosen,
                  reference_rejected) -> tuple[PreferenceLoss, torch.Tensor, torch.Tensor]:
        """The preference loss of each pair of `batch` under `model`, with its policy log-probs (chosen, rejected)."""
        p = self.params
        logps, counts = self.sequence_logps(model, batch)
        chosen, rejected = logps.chunk(2)
        chosen_counts, rejected_counts = counts.chunk(2)
        out = preference_loss(chosen, rejected, reference_chosen, reference_rejected, loss_type=p.loss_type,
                              beta=p.beta, label_smoothing=p.label_smoothing, simpo_gamma=p.simpo_gamma,
                              chosen_counts=chosen_counts, rejected_counts=rejected_counts)
        return out, chosen, rejected

    def sequence_logps(self, model: TransformerDecoder, batch: dict[str, torch.Tensor]):
        """Summed log-probs (float32 [2B]) and label counts ([2B]) of each row's labelled tokens under `model`.

        With `chunked_loss` the model returns its final hidden states and the output projection runs inside
        `sequence_logps`, `loss_chunk_size` tokens at a time. FSDP keeps the root's parameters (the head among them)
        gathered from the root's forward on (until the backward, or `reshard`), so `lm_head.weight` is the full weight.
        """
        p = self.params
        if p.chunked_loss:
            hidden = model(batch["tokens"], return_hidden=True)
            return sequence_logps(hidden, model.lm_head.weight, batch["labels"], chunk_size=p.loss_chunk_size,
                                  positions=batch["label_positions"])
        return sequence_logps_from_logits(model(batch["tokens"]), batch["labels"])

    def evaluate(self) -> dict[str, float]:
        """The step's metrics on the validation pairs (the first `max_eval_batches` batches per rank), prefixed val_.

        Each dp rank sums the metrics of its shard (the wrap-around repeats left out); the sums are added over all
        ranks (each tp group counted once).
        """
        p = self.params
        dp_size, num_items = self.dp_size, len(self.val_dataloader.dataset)
        self.model.eval()
        outputs = []
        with torch.no_grad():
            for index, batch in enumerate(self.val_dataloader):
                if p.max_eval_batches is not None and index >= p.max_eval_batches:
                    break
                # This dp rank's j-th pair is position dp_rank + j * dp_size of the validation order; positions past
                # its end are the wrap-around repeats: they run (FSDP's forwards are collectives) but do not count.
                first = index * p.batch_size
                positions = self.dp_rank + dp_size * torch.arange(first, first + len(batch["tokens"]) // 2)
                keep = (positions < num_items).to(self.device)
                batch = move_batch(batch, self.device)
                reference_chosen, reference_rejected = self.reference_logps(batch)
                out, chosen, rejected = self.pair_loss(self.model, batch, reference_chosen, reference_rejected)
                outputs.append((select(out, keep), chosen[keep], rejected[keep]))
        self.model.train()
        local = step_metric_sums(outputs)
        names = sorted(local)
        *sums, num_pairs = (total / self.tp for total in distributed.all_reduce_sum(
            [local[name] for name in names] + [local_count(outputs)], self.device))
        metrics = {f"val_{name}": value / max(num_pairs, 1) for name, value in zip(names, sums)}
        return {**metrics, "val_pairs": int(num_pairs)}

    def save_checkpoint(self) -> Path:
        """`output_dir/step_<N>`: every rank gathers the policy's weights and rank 0 writes the Hugging Face layout
        (atomically); then every rank gathers the sharded optimizer state and rank 0 writes `recipe_state.pt` (via a
        temporary file and a rename: a `step_<N>` with recipe_state.pt is complete) and keeps the newest
        `keep_last_n_checkpoints`. Saving the same step twice (a preemption right after a periodic save) writes nothing.
        The reference is not saved: it is `checkpoint_dir` (or the seeded random start)."""
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


def detached(out: PreferenceLoss) -> PreferenceLoss:
    return PreferenceLoss(losses=out.losses.detach(), chosen_rewards=out.chosen_rewards.detach(),
                          rejected_rewards=out.rejected_rewards.detach())


def select(out: PreferenceLoss, keep: torch.Tensor) -> PreferenceLoss:
    """The pairs of `out` where the bool mask `keep` is set."""
    return PreferenceLoss(losses=out.losses[keep], chosen_rewards=out.chosen_rewards[keep],
                          rejected_rewards=out.rejected_rewards[keep])


def local_count(outputs: list[tuple[PreferenceLoss, torch.Tensor, torch.Tensor]]) -> int:
    return sum(len(out.losses) for out, _, _ in outputs)


def step_metric_sums(outputs: list[tuple[PreferenceLoss, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Sums over this rank's pairs of the loss and of `preference_metrics`' per-pair means (rewards, accuracies,
    margins, log-probs): divided by the pairs of all ranks they give the step's means, whatever the split."""
    outputs = [output for output in outputs if len(output[0].losses)]
    if not outputs:  # this rank had only wrap-around repeats: it adds nothing
        return {"loss": 0.0, **dict.fromkeys(METRIC_NAMES, 0.0)}
    out = PreferenceLoss(losses=torch.cat([o.losses for o, _, _ in outputs]),
                         chosen_rewards=torch.cat([o.chosen_rewards for o, _, _ in outputs]),
                         rejected_rewards=torch.cat([o.rejected_rewards for o, _, _ in outputs]))
    chosen, rejected = torch.cat([c for _, c, _ in outputs]), torch.cat([r for _, _, r in outputs])
    count = len(out.losses)
    means = preference_metrics(out, chosen, rejected)
    return {"loss": float(out.losses.sum()), **{name: value * count for name, value in means.items()}}


def report_dataset(field: str, dataset) -> None:
    """One line of counts (pairs, tokens, truncated, dropped, bad rows skipped, cache), and the first skipped rows."""
    print(f"{field}: {dataset.summary()}", flush=True)
    for message in dataset.stats.get("skipped_examples", []):
        print(f"  skipped {message}", flush=True)


def recipe_main(params: FullDPODistributedParams) -> Path:
    """Run the whole recipe on this rank; returns the directory of the saved checkpoint."""
    exit_with_launcher()  # under torchrun: stop (saving) when the launcher dies
    require_input_paths(params)  # hub dataset names (owner/name) are not missing paths
    recipe = None
    try:
        recipe = FullDPORecipeDistributed(params)
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
        print(run_summary("full_dpo_distributed", recipe.global_step, recipe.last_logged, out_dir, adapter=False),
              flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = TuneArgumentParser(FullDPODistributedParams, recipe=__file__)
    recipe_main(parser.parse_params(argv))


if __name__ == "__main__":
    run_or_exit(main, prog="full_dpo_distributed")
