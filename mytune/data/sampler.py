"""Distributed, resumable sampling: each rank reads its own shard, and a resumed run sees exactly the same batches.

Each epoch has one global order of the dataset (a permutation seeded by `(seed, epoch)`, or 0..n-1 without
shuffle), made a multiple of `world_size` long by dropping the tail (`drop_last`) or wrapping around. Rank r reads
positions r, r + world_size, r + 2 * world_size, ... of what is left of it. The state is `(epoch, consumed)`: how
many positions of this epoch's global order training has used, summed over ranks. `ResumableDataLoader` advances it
by `batch_size * world_size` each time it hands a batch to the training loop (not when workers prefetch), so the state
saved with a checkpoint after step k says exactly "k batches per rank are done". Loading it and iterating again
continues with batch k + 1; because the state counts global positions, a resumed run may even use another
`world_size` (the remaining global order is then dealt out to the new ranks).

Every rank must use the same `seed`; ranks advance in lockstep (one batch each per step), as DDP/FSDP training does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from mytune.errors import MytuneError


def _distributed_rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[int]):
    """Yields this rank's dataset indices for the current epoch, starting after what was already consumed.

    `rank`/`world_size` default to torch.distributed's (0/1 when not initialized). Call `set_epoch(epoch)` before each
    epoch: a new epoch starts at 0, the current one (after `load_state_dict`) resumes where it stopped.
    """

    def __init__(self, dataset: Sized | int, *, rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True):
        self.num_samples = dataset if isinstance(dataset, int) else len(dataset)
        # A weighted dataset mix (mix.py) orders its own epochs; the state below still resumes it exactly.
        self._mix = dataset if getattr(dataset, "mix_weights", None) is not None else None
        default_rank, default_size = _distributed_rank_and_size()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_size if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0  # positions of this epoch's global order already used by training, all ranks together

    # ---- the epoch's order -------------------------------------------------------------------------------------------
    @property
    def global_epoch_length(self) -> int:
        """Positions in one epoch's global order (a multiple of world_size)."""
        whole, rest = divmod(self.num_samples, self.world_size)
        return (whole + (0 if self.drop_last or rest == 0 else 1)) * self.world_size

    @property
    def samples_per_epoch(self) -> int:
        """Indices this rank reads in a whole epoch."""
        return self.global_epoch_length // self.world_size

    def _global_order(self) -> np.ndarray:
        if self._mix is not None:
            order = self._mix.epoch_order(self.seed, self.epoch, self.shuffle)
        elif self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        length = self.global_epoch_length
        if length > len(order):  # wrap around so every rank gets the same number of indices
            order = np.resize(order, length)
        return order[:length]

    def rank_indices(self) -> np.ndarray:
        """What `__iter__` will yield: this rank's remaining indices of the current epoch."""
        return self._global_order()[self.consumed + self.rank:: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices().tolist())

    def __len__(self) -> int:
        remaining = max(0, self.global_epoch_length - self.consumed)
        return remaining // self.world_size

    # ---- progress ----------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def advance(self, samples_per_rank: int) -> None:
        """Record that every rank handed `samples_per_rank` more samples to training."""
        self.consumed = min(self.global_epoch_length, self.consumed + samples_per_rank * self.world_size)

    @property
    def mix_weights(self) -> list[float] | None:
        return None if self._mix is None else list(self._mix.mix_weights)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "shuffle": self.shuffle,
                 "num_samples": self.num_samples, "world_size": self.world_size}
        if self._mix is not None:
            state["mix_weights"] = self.mix_weights
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "shuffle", "num_samples", "mix_weights"):
            if state.get(key) != getattr(self, key) and (key in state or key == "mix_weights"):
                raise MytuneError(
                    f"the data sampler state in the checkpoint has {key}={state.get(key)!r} but this run has "
                    f"{getattr(self, key)!r}; resume with the same dataset, seed and shuffle setting "
                    "(and dataset_weights)"
                )
        self.epoch = int(state["epoch"])
        self.consumed = min(int(state["consumed"]), self.global_epoch_length)


class ResumableDataLoader:
    """A `DataLoader` over a `ResumableSampler` that counts the batches the training loop has taken.

    `len(loader)` is the number of batches per rank in a whole epoch (not what is left after a resume:
    `loader.batches_consumed` says how many of them are done). `set_epoch`, `state_dict` and `load_state_dict`
    act on the sampler; save `loader.state_dict()` in the recipe checkpoint.
    """

    def __init__(self, dataset, *, batch_size: int, sampler: ResumableSampler, collate_fn: Callable | None = None,
                 num_workers: int = 0, drop_last: bool = True, **loader_kwargs):
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = sampler
        self.drop_last = drop_last
        # Its own generator: every `iter(DataLoader)` draws a worker base seed from `generator`, which would
        # otherwise be the global torch RNG, so a resumed run (one more iterator) would draw other dropout masks.
        loader_kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        self._loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                                  num_workers=num_workers, drop_last=drop_last, **loader_kwargs)

    def __iter__(self) -> Iterator:
        # Count the sampler's indices, not the collated rows: a collate may make several rows of one item (a
        # preference pair is a chosen and a rejected row). Every batch holds batch_size indices but a last partial one.
        remaining = len(self.sampler)
        for batch in self._loader:
            taken = min(self.batch_size, remaining)
            remaining -= taken
            self.sampler.advance(taken)
            yield batch

    def __len__(self) -> int:
        per_rank = self.sampler.samples_per_epoch
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    @property
    def batches_consumed(self) -> int:
        return self.sampler.consumed // (self.sampler.world_size * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
