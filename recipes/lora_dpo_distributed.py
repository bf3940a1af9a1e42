"""Preference tuning (DPO, IPO, SimPO) with LoRA / DoRA / QLoRA adapters, sharded over several processes with FSDP2.

    mytune --nproc_per_node 8 lora_dpo_distributed --config llama3_1_8b --override checkpoint_dir=/models/Llama-3.1-8B \
        dataset_path=my_pairs.jsonl
    mytune --nproc_per_node 2 lora_dpo_distributed --config tiny_demo          # CPU, gloo
    mytune --nproc_per_node 8 lora_dpo_distributed --config llama3_1_70b --override tensor_parallel_dim=8

`lora_finetune_distributed` (sharding, loading, checkpoints) trained on preference pairs as `lora_dpo_single_device`
does (the duplication is on purpose: read or copy one file). Each rank takes its own pairs of every global batch
(`batch_size` per rank); a micro-batch of B pairs is one forward of 2B rows (chosen first, then rejected). The
reference model is the policy with its adapters turned off (`adapters_disabled`, one more sharded forward under
no_grad: no second copy of the weights), or precomputed once at setup over the whole data with
`precompute_reference_logps` (each rank computes a block, every rank gets all of it; cached on disk by rank 0).
Tensor parallel (`tensor_parallel_dim` > 1) is `lora_finetune_distributed`'s: a (dp, tp) mesh, each decoder layer
split over the tp ranks of a group (adapters following their base layer), FSDP over dp; QLoRA is refused under TP.
The tp ranks of a group read the same pairs (data split by the dp rank, also for `precompute_reference_logps`: each
tp group computes one block together); pair counts and metric sums are all-reduced over all ranks and divided by tp.

The loss of an optimizer step is the mean of the preference losses of all its pairs on all ranks; the logged
rewards/*, logps/* are means over the same pairs, and validation (val_loss, val_rewards/accuracies, ...) averages over
every held-out pair once. Checkpoints, resume (also on another number of processes), SIGTERM and the nan guard are
those of `lora_finetune_distributed`: `output_dir/step_<N>/` the merged Hugging Face model, `step_<N>/adapter/` the
PEFT adapter (float32), `recipe_state.pt`; a random start also writes `output_dir/base_model/`.
"""

import dataclasses
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mytune.checkpoint import load_hf_model, load_peft_adapter, read_hf_model_args, save_hf_checkpoint, save_peft_adapter
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
from mytune.tokenizers import load_tokenizer, write_tokenizer_files
from mytune.training import distributed
from mytune.training.device import move_batch, set_seed
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
from mytune.training.tensor_parallel import (
    apply_tensor_parallel,
    check_tensor_parallel,
    clip_grad_norm_,
    make_device_mesh,
    mesh_dim,
)
from recipes.params.lora_dpo_distributed import LoRADPODistributedParams

ADAPTER_DIR_NAME = "adapter"


class LoRADPORecipeDistributed:
    """load_checkpoint -> setup -> train -> save_checkpoint -> cleanup, on every rank."""

    def __init__(self, params: LoRADPODistributedParams):
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
        self.save_dtype = torch.bfloat16 if params.dtype == "bf16" else torch.float32
        self.global_step = 0
        self.last_logged: dict = {}  # rank 0's newest logged metrics, for the closing summary
        self.epoch = 0
        # Rank 0 decides where to resume from (None: a fresh run) and tells the others, so all ranks agree.
        # Rank 0 also holds the output_dir's lock until cleanup and refuses to mix with another run's step_<N>.
        self.run_lock = None

        def claim():
            self.run_lock, resume_dir = claim_output_dir(params.output_dir, params.resume_from_checkpoint,
                                                         overwrite=params.overwrite_output_dir,
                                                         needs=(ADAPTER_DIR_NAME,))
            return resume_dir

        self.resume_dir = distributed.decided_by_rank_zero(claim)
        self.last_checkpoint = self.resume_dir  # the newest complete checkpoint, named when the loss turns nan
        self.last_saved_step = None
        self.preemption = StopSignals()  # SIGTERM or Ctrl-C -> a flag; installed while `train` runs
        self.stop_requested = False  # any rank signalled: set by train_step, the same on every rank
        set_seed(params.seed)  # the same seed on every rank: rank 0's random start and adapters, and the data order

    def load_checkpoint(self) -> None:
        """The frozen base with its adapters, sharded over the ranks; weights read and adapters initialised by rank 0.

        From `checkpoint_dir`, or a seeded random `model` (saved to `output_dir/base_model` for the adapter to name).
        Rank 0 builds the whole float32 LoRA model on the CPU (base, then `apply_lora`, seeded like the single-device
        recipe) and keeps its state dict; a resumed run then reads the trained adapters back from the step's
        `adapter/` into it. The other ranks only learn the shapes. Every rank then builds the LoRA model on the meta
        device, shards it and receives its shards. With dtype=bf16 the frozen base is stored in bf16 and the
        adapters stay float32 masters (the FSDP mixed-precision policy casts them for compute).
        """
        p = self.params
        full_state_dict = None
        if p.checkpoint_dir:
            args = read_hf_model_args(p.checkpoint_dir)  # config.json and generation_config.json, kept whole for the save
            self.base_model_path = Path(p.checkpoint_dir).resolve()
        else:
            # A fresh model sized to the tokenizer: the demo and tests start here, seeded by set_seed above.
            args = model_args(p.model)
            args.vocab_size = self.tokenizer.vocab_size
            args.bos_token_id, args.eos_token_id = self.tokenizer.bos_id, self.tokenizer.eos_id
            self.base_model_path = (self.output_dir / "base_model").resolve()
        if self.tokenizer.vocab_size > args.vocab_size:
            raise MytuneError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's embedding has only "
                f"{args.vocab_size}: tokenizer_path does not belong to this checkpoint"
            )
        with distributed.error_from_rank_zero():  # one line if tp does not divide the heads or the MLP
            check_tensor_parallel(args, self.tp)
        if self.is_rank_zero:
            if p.checkpoint_dir:
                cpu_model = load_hf_model(p.checkpoint_dir, device="cpu", dtype=torch.float32)
            else:
                cpu_model = TransformerDecoder(args)  # seeded: a resumed run rebuilds the same base
                if self.resume_dir is None or not self.base_model_path.is_dir():
                    save_hf_checkpoint(cpu_model, self.base_model_path, dtype=self.save_dtype,
                                       tokenizer_files=self.tokenizer.files)
            # QLoRA: quantized as single-device QLoRA does (on the device, layer by layer): NF4 in the state dict.
            self.apply_lora(cpu_model, device=self.device if p.quantize_base else None)
            if self.resume_dir is not None:
                load_peft_adapter(cpu_model, self.resume_dir / ADAPTER_DIR_NAME)
            full_state_dict = cpu_model.state_dict()
            del cpu_model
        with torch.device("meta"):
            self.model = TransformerDecoder(args)
        self.apply_lora(self.model)  # the same modules on the meta device (nothing allocated, no random numbers)
        if p.dtype == "bf16":
            # The frozen base needs no float32 master copy (it is never updated): stored in bf16 its shards take
            # half the memory. Adapters stay float32 masters; compute is bf16 either way.
            for param in self.model.parameters():
                if not param.requires_grad and type(param.data) is torch.Tensor:  # not NF4: QLoRA keeps its own
                    param.data = param.data.to(torch.bfloat16)
        # Tensor parallel before the wrappers and FSDP: each layer's weights and adapters become DTensors split over
        # the tp ranks (nothing changes at tp=1), which FSDP then shards again over the dp ranks.
        apply_tensor_parallel(self.model, self.tp_mesh, sequence_parallel=p.sequence_parallel)
        # Before sharding; neither changes parameter names or state-dict keys.
        if p.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if p.compile:
            compile_layers(self.model)
        # Each decoder layer is one FSDP unit holding its frozen weights and trainable adapters: FSDP2 reduces
        # gradients for the parameters that have them only.
        distributed.shard_model(self.model, bf16=p.dtype == "bf16", cpu_offload=p.cpu_offload,
                               reshard_after_forward=p.fsdp_reshard_after_forward, mesh=self.dp_mesh)
        distributed.load_full_state_dict(self.model, full_state_dict, self.device)
        del full_state_dict

    def apply_lora(self, model: TransformerDecoder, device: torch.device | None = None) -> None:
        p = self.params
        apply_lora(model, p.lora_target_modules, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
                   use_dora=p.use_dora, quantize_base=p.quantize_base, device=device)

    def setup(self) -> None:
        p = self.params
        # Tokenizer and data before the model: a bad dataset row fails in seconds, not after the weights are read.
        self.tokenizer = load_tokenizer(p.tokenizer_path or p.checkpoint_dir)
        self.setup_data()
        self.load_checkpoint()
        self.model.train()
        self.model.attention_backend = p.attention_backend
        self.offload_activations = use_activation_offloading(p.activation_offloading, self.device)
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
                f"optimizer step needs (batch_size * gradient_accumulation_steps * data-parallel size = "
                f"{p.batch_size * p.gradient_accumulation_steps * self.dp_size})"
            )
        self.total_steps = self.steps_per_epoch * p.epochs

        # Only the adapters train: the frozen base gets neither gradients nor optimizer state.
        self.trainable = trainable_parameters(self.model)
        self.optimizer = build_optimizer(self.trainable, p.optimizer, lr=p.lr, weight_decay=p.weight_decay,
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
            n_trainable = sum(t.numel() for t in self.trainable)
            kind = ("QDoRA" if p.quantize_base else "DoRA") if p.use_dora else ("QLoRA" if p.quantize_base else "LoRA")
            reference = ("none (simpo)" if p.loss_type == "simpo" else
                         "precomputed" if p.precompute_reference_logps else "adapters off, per batch")
            layout = (f" (FSDP over {self.dp_size} x tensor parallel over {self.tp}"
                      f"{', sequence parallel' if p.sequence_parallel else ''})" if self.tp > 1 else "")
            print(
                f"lora_dpo_distributed: {p.loss_type} (beta {p.beta}) with {kind} rank {p.lora_rank} on "
                f"{', '.join(p.lora_target_modules)}: {n_trainable / 1e6:.2f}M trainable of {n_params / 1e6:.1f}M "
                f"params sharded over {self.dist.world_size} process(es){layout} on {self.device.type} in {p.dtype}, "
                f"reference {reference}, {self.total_steps} steps of "
                f"{p.batch_size * p.gradient_accumulation_steps * self.dp_size} pairs with {p.optimizer}",
                flush=True,
            )

    def setup_data(self) -> None:
        """Tokenized preference datasets and a validation split, the same on every rank.

        Rank 0 tokenizes first and writes the on-disk cache; the other ranks then load it from there instead of
        tokenizing again (with dataset_cache_dir=off they tokenize after rank 0). A bad row is reported once, by rank 0.
        Each item holds the chosen and the rejected response with its prompt (labels -100 on the prompt).
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

    def precompute_reference(self) -> None:
        """The reference's log-probs of every training and validation pair, once (or read from rank 0's cache),
        attached to the datasets by index: the loaders' batches then carry them. Every rank computes a block of the
        pairs (sharded forwards are collectives) and ends with the whole table."""
        p = self.params
        identity = None
        if self.is_rank_zero:  # base_model/ of a random start exists: rank 0 wrote it before the weights went out
            identity = {"checkpoint": checkpoint_identity(self.base_model_path), "dtype": p.dtype,
                        "quantize_base": p.quantize_base, "chunked": self.chunked_loss}
        compute = partial(reference_logps_for, logps_fn=self.reference_logps, cache_dir=self.cache_dir,
                          model_identity=identity, batch_size=p.batch_size, collate=self.collate, device=self.device,
                          rank=self.dist.rank, world_size=self.dist.world_size, group=self.dp_mesh.get_group())
        self.dataset = WithReferenceLogps(self.dataset, compute(self.dataset, name="dataset_path"))
        if self.val_dataset is not None:
            self.val_dataset = WithReferenceLogps(self.val_dataset, compute(self.val_dataset, name="validation"))
        # Forwards without a backward leave the last layer's and the root's weights gathered (FSDP keeps them for
        # the backward): shard them again, so that the optimizer is built on (and the memory is that of) the shards.
        distributed.reshard(self.model)

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """`[2B, S]` rows (the B chosen, then the B rejected responses), with the precomputed reference log-probs when
        the items carry them; under sequence parallel (which cuts it in tp equal parts) S is a multiple of tp."""
        multiple = self.tp if self.params.sequence_parallel else 1
        return collate_with_reference(items, collate=partial(preference_collate, pad_id=self.tokenizer.pad_id,
                                                             pad_to_multiple_of=multiple))

    def setup_loaders(self) -> None:
        """Loaders that give each rank its own pairs. The sampler's state (epoch, pairs consumed by all ranks) is
        what a checkpoint needs to resume the data where it stopped: `self.dataloader.state_dict()`."""
        p = self.params
        # Data-parallel rank d takes positions d, d + dp, d + 2 * dp, ... of each epoch's seeded order (the same on
        # every rank); the tp ranks of one group share a dp rank and so read the same pairs.
        sampler = ResumableSampler(self.dataset, rank=self.dp_rank, world_size=self.dp_size,
                                   shuffle=p.shuffle, seed=p.seed)
        # Pinned on CUDA: move_batch's non-blocking copies then overlap the host's work.
        pin = self.device.type == "cuda"
        self.dataloader = ResumableDataLoader(self.dataset, batch_size=p.batch_size, sampler=sampler,
                                              collate_fn=self.collate, pin_memory=pin)
        self.val_dataloader = None
        if self.val_dataset is not None:
            # A plain DataLoader in a fixed order: every validation starts at the first batch. Without drop_last the
            # sampler wraps around so that every rank runs the same number of forwards (FSDP needs that); `evaluate`
            # leaves the repeated pairs out.
            val_sampler = ResumableSampler(self.val_dataset, rank=self.dp_rank, world_size=self.dp_size,
                                           shuffle=False, drop_last=False)
            self.val_dataloader = DataLoader(self.val_dataset, batch_size=p.batch_size, sampler=val_sampler,
                                             collate_fn=self.collate, pin_memory=pin)

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
                    tokens_per_s = metrics["num_tokens"] / seconds  # all ranks' tokens: the job's throughput
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
        are the same on every rank (loss and metrics averaged over all pairs of all ranks)."""
        p = self.params
        # The step's loss is the mean over ALL its pairs on all ranks, not per rank or micro-batch. The sums run over
        # every rank, and the tp ranks of a group hold the same pairs: divided by tp, each counts once.
        local_pairs = sum(len(b["tokens"]) // 2 for b in micro_batches)  # each batch: B chosen + B rejected rows
        local_input_tokens = sum(int(b["seq_lens"].sum()) for b in micro_batches)  # real tokens, no padding
        num_pairs, num_input_tokens = (total / self.tp for total in distributed.all_reduce_sum(
            [local_pairs, local_input_tokens], self.device))
        results = []  # detached; read after the loop: one device sync per step, not one per micro-batch
        for batch in micro_batches:
            batch = move_batch(batch, self.device)
            reference = self.batch_reference_logps(batch)  # first: its activations are gone before the policy's
            with activation_offloading(self.offload_activations):  # the forward only: the backward brings them back
                out, chosen, rejected = self.preference_forward(batch, reference)
            # FSDP averages gradients over the dp ranks; scaling by their number turns that mean into the sum, so
            # the gradient is that of sum(pair losses of the global batch) / num_pairs (the tp ranks of a group
            # compute one gradient together: DTensor sums the parts, nothing to scale).
            (out.losses.sum() / num_pairs * self.dp_size).backward()
            results.append((out, chosen.detach(), rejected.detach()))
        out, chosen, rejected = concat_results(results)
        # Sums over this rank's pairs; the preemption flag rides on the all-reduce the step does anyway: every rank
        # learns whether any rank was signalled (SIGTERM) without a collective of its own, so all stop together.
        local = [out.losses.sum(), *(preference_metric_tensor(out, chosen, rejected) * local_pairs)]
        totals = distributed.all_reduce_sum([*torch.stack(local).tolist(), float(self.preemption.should_stop)],
                                            self.device)
        self.stop_requested = totals[-1] > 0
        totals = [total / self.tp for total in totals[:-1]]  # each tp group's pairs counted once
        step_loss = totals[0] / num_pairs
        lr = float(self.lr_scheduler.get_last_lr()[0])  # torchao's low-bit AdamW keeps lr as a tensor
        # The same value on every rank, so all ranks raise together; before the optimizer step.
        check_finite(step_loss, self.global_step + 1, last_checkpoint=self.last_checkpoint, lr=lr, model=self.model)
        grad_norm = None
        if p.max_grad_norm is not None:
            # Under TP the gradients are DTensors on two meshes (dp x tp, and dp), which torch's own clip cannot mix.
            clip = clip_grad_norm_ if self.tp > 1 else torch.nn.utils.clip_grad_norm_
            norm = clip(self.trainable, p.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.global_step += 1
        metrics = {name: value / num_pairs for name, value in zip(METRIC_NAMES, totals[1:])}
        return {"step": self.global_step, "loss": step_loss, **metrics, "lr": lr, "grad_norm": grad_norm,
                "num_tokens": int(num_input_tokens)}

    def policy_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's summed log-probs of each row's response tokens (float32 `[2B]`) and their counts.

        With `chunked_loss` the model returns its final hidden states and the output projection runs inside
        `sequence_logps`, `loss_chunk_size` tokens at a time. FSDP keeps the root's parameters (the head among them)
        gathered from the root's forward until its backward, so `lm_head.weight` is the full weight here. When
        lm_head is a LoRA target the log-probs come from the full logits (the projection goes through the adapter).
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
        """The preference loss and metrics over the validation pairs (its first `max_eval_batches` batches per rank),
        as `val_loss`, `val_rewards/accuracies`, ...: means over the pairs of all ranks, each pair counted once."""
        p = self.params
        dp_size, num_items = self.dp_size, len(self.val_dataloader.dataset)
        self.model.eval()
        results = []
        with torch.no_grad():
            for index, batch in enumerate(self.val_dataloader):
                if p.max_eval_batches is not None and index >= p.max_eval_batches:
                    break
                batch = move_batch(batch, self.device)
                out, chosen, rejected = self.preference_forward(batch, self.batch_reference_logps(batch))
                # This dp rank's j-th pair is position dp_rank + j * dp_size of the validation order; positions past
                # its end are the wrap-around repeats: left out.
                first = index * p.batch_size
                positions = self.dp_rank + dp_size * torch.arange(first, first + len(chosen))
                keep = (positions < num_items).to(self.device)
                results.append((PreferenceLoss(*(t[keep] for t in out)), chosen[keep], rejected[keep]))
        self.model.train()
        out, chosen, rejected = concat_results(results)
        count = len(out.losses)
        local = torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float32, device=self.device)
        if count:
            local = torch.cat([out.losses.sum().view(1), preference_metric_tensor(out, chosen, rejected) * count])
        *totals, num_pairs = (total / self.tp for total in distributed.all_reduce_sum([*local.tolist(), count],
                                                                                     self.device))
        metrics = {"loss": totals[0] / max(num_pairs, 1)}
        metrics.update({name: value / max(num_pairs, 1) for name, value in zip(METRIC_NAMES, totals[1:])})
        return {**{f"val_{name}": value for name, value in metrics.items()}, "val_pairs": int(num_pairs)}

    def save_checkpoint(self) -> Path:
        """`output_dir/step_<N>`: the merged Hugging Face checkpoint, in it `adapter/` (the PEFT adapter, float32),
        then `recipe_state.pt` (via a temporary file and a rename: a `step_<N>` with recipe_state.pt is complete).

        Every rank gathers the full state dict (a collective) onto the CPU; rank 0 rebuilds the LoRA model from it
        and writes both directories (each atomically), the merged one built a layer at a time on the CPU. Then every
        rank gathers the adapters' sharded optimizer state and rank 0 writes it with the rest of the recipe state and
        keeps the newest `keep_last_n_checkpoints`. Saving the same step twice (a preemption right after a periodic
        save) writes nothing.
        """
        p = self.params
        out_dir = self.output_dir / f"step_{self.global_step}"
        if self.last_saved_step == self.global_step:
            return out_dir
        # NF4 weights (QLoRA) come back whole; the CPU model gets the same adapters before the tensors go in.
        full_model = distributed.gather_full_model(self.model, prepare=self.apply_lora)
        if self.is_rank_zero:
            merged = merge_lora(full_model)
            save_hf_checkpoint(merged, out_dir, dtype=self.save_dtype)
            del merged
            write_tokenizer_files(self.tokenizer, out_dir)
            save_peft_adapter(
                full_model, out_dir / ADAPTER_DIR_NAME, base_model_name_or_path=str(self.base_model_path),
                targets=p.lora_target_modules, rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
                use_dora=p.use_dora, dtype=torch.float32,
            )
        del full_model
        save_recipe_state(out_dir, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, model=self.model,
                          dataloader_state=self.dataloader.state_dict(), global_step=self.global_step,
                          epoch=self.epoch, extra={"params": params_record(p, total_steps=self.total_steps)})
        self.last_saved_step, self.last_checkpoint = self.global_step, out_dir
        if self.is_rank_zero:
            if p.keep_last_n_checkpoints is not None:
                prune_checkpoints(self.output_dir, p.keep_last_n_checkpoints, protect=out_dir)
            print(f"saved merged checkpoint to {out_dir} and the PEFT adapter to {out_dir / ADAPTER_DIR_NAME}",
                  flush=True)
        distributed.barrier()  # no rank returns before the checkpoint exists
        return out_dir

    def cleanup(self) -> None:
        if self.is_rank_zero:
            self.metric_logger.close()
            self.run_lock.release()
        distributed.destroy_distributed()


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



def recipe_main(params: LoRADPODistributedParams) -> Path:
    """Run the whole recipe on this rank; returns the directory of the saved (merged) checkpoint, the adapter in
    its `adapter/`."""
    exit_with_launcher()  # under torchrun: stop (saving) when the launcher dies
    require_input_paths(params)  # hub dataset names (owner/name) are not missing paths
    recipe = None
    try:
        recipe = LoRADPORecipeDistributed(params)
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
        print(run_summary("lora_dpo_distributed", recipe.global_step, recipe.last_logged, out_dir, adapter=True),
              flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = TuneArgumentParser(LoRADPODistributedParams, recipe=__file__)
    recipe_main(parser.parse_params(argv))


if __name__ == "__main__":
    run_or_exit(main, prog="lora_dpo_distributed")
