"""Several datasets in one run: `dataset_path=[a.jsonl, owner/name, dir/]`, optionally `dataset_weights=[0.7, 0.3, ...]`.

Each source is built on its own (its own format, column map and tokenization cache entry) and the items are
concatenated. Without weights an epoch is the plain concatenation, shuffled as one dataset. With weights, each epoch
is as long as the concatenation, and each position draws a source with probability `weight / sum(weights)`
(a generator seeded by `(seed, epoch)`); the k-th draw from a source takes the k-th item of that source's own seeded
permutation, starting a fresh permutation when a small source is used up (upsampling), so no item repeats before
every item of its source was seen. The order is a pure function of `(seed, epoch)`, so `ResumableSampler`'s state
(epoch, positions consumed) resumes the mix exactly; the sampler asks `MixedDataset.epoch_order` for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from mytune.config.validation import check_dataset_mix, dataset_sources
from mytune.errors import MytuneError


class MixedDataset(Dataset):
    """The items of several datasets back to back; `weights` (or None: plain concatenation) drive `epoch_order`."""

    def __init__(self, datasets: Sequence[Dataset], names: Sequence[str], weights: Sequence[float] | None = None):
        if not datasets:
            raise MytuneError("a dataset mix needs at least one source")
        self.datasets = list(datasets)
        self.names = list(names)
        self.sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        for name, size in zip(self.names, self.sizes):
            if size == 0:
                raise MytuneError(f"{name}: no items to train on in this dataset mix")
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.mix_weights = None if weights is None else [float(w) for w in weights]
        first = self.datasets[0]
        self.max_seq_len = getattr(first, "max_seq_len", None)
        self.packed = getattr(first, "packed", False)

    # ---- items ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        source = int(np.searchsorted(self.starts, index, side="right") - 1)
        return self.datasets[source][index - int(self.starts[source])]

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        """Which source each global item index belongs to."""
        return np.searchsorted(self.starts, np.asarray(indices), side="right") - 1

    def epoch_order(self, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
        """The epoch's global item order by weight (see the module docstring); a pure function of (seed, epoch)."""
        n = len(self)
        if self.mix_weights is None:
            order = np.arange(n)
            return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else order
        rng = np.random.default_rng([seed, epoch, 0x6D6978])  # its own stream: not the plain shuffle's
        probabilities = np.asarray(self.mix_weights) / sum(self.mix_weights)
        choices = rng.choice(len(self.datasets), size=n, p=probabilities)
        order = np.empty(n, dtype=np.int64)
        for source, size in enumerate(self.sizes.tolist()):
            where = np.flatnonzero(choices == source)
            if not len(where):
                continue
            rounds = -(-len(where) // size)
            local = np.concatenate([rng.permutation(size) if shuffle else np.arange(size) for _ in range(rounds)])
            order[where] = self.starts[source] + local[: len(where)]
        return order

    # ---- what recipes report ----------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(sum(getattr(d, "num_samples", len(d)) for d in self.datasets))

    @property
    def stats(self) -> dict:
        skipped = [m for d in self.datasets for m in getattr(d, "stats", {}).get("skipped_examples", [])]
        return {"skipped_examples": skipped}

    def token_counts(self) -> list[int]:
        return [count for d in self.datasets for count in d.token_counts()]

    def summary(self) -> str:
        weights = self.mix_weights or [float(s) for s in self.sizes]
        total = sum(weights)
        parts = [f"{name} ({100 * w / total:.0f}%): {d.summary()}"
                 for name, w, d in zip(self.names, weights, self.datasets)]
        how = "weighted" if self.mix_weights else "concatenated, by size"
        return f"mix of {len(self.datasets)} sources ({how}): " + "; ".join(parts)

    def split_validation(self, val_fraction: float, *, seed: int = 0) -> tuple["MixedDataset", "MixedDataset"]:
        """Each source split on its own (same rule as `split_validation`); validation is their concatenation."""
        from mytune.data.sft import split_validation

        pairs = [split_validation(d, val_fraction, seed=seed) for d in self.datasets]
        return (MixedDataset([t for t, _ in pairs], self.names, self.mix_weights),
                MixedDataset([v for _, v in pairs], self.names, None))


def build_dataset_mix(build: Callable[..., Dataset], dataset_path: str | Sequence[str], *,
                      weights: Sequence[float] = (), formats: Sequence[str] = (),
                      column_maps: Sequence[Mapping] = ()) -> Dataset:
    """`build(path)` for one source (unchanged behaviour); for several, a MixedDataset of `build(path, **overrides)`.

    `formats[i]` ("auto" = detect) and `column_maps[i]` override `build`'s dataset_format / column_map for source i.
    """
    sources = dataset_sources(dataset_path)
    maps = [dict(m) if isinstance(m, Mapping) else m for m in column_maps]
    check_dataset_mix(sources, list(weights), list(formats), maps)
    if len(sources) == 1 and not (formats or column_maps or weights):
        return build(sources[0])
    datasets = []
    for index, source in enumerate(sources):
        overrides: dict = {}
        if formats:
            overrides["dataset_format"] = None if formats[index] == "auto" else formats[index]
        if column_maps:
            overrides["column_map"] = dict(column_maps[index])
        datasets.append(build(source, **overrides))
    return MixedDataset(datasets, sources, list(weights) if weights else None)
