"""ResumableSampler / ResumableDataLoader: disjoint rank shards, seeded epochs, and exact resumption."""

import copy

import pytest
import torch

from mytune.data import ResumableDataLoader, ResumableSampler
from mytune.errors import MytuneError


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tokens": [i]}


def _collate(items):
    return {"tokens": torch.tensor([item["tokens"][0] for item in items])}


def _loader(n=23, batch_size=3, rank=0, world_size=1, seed=7, num_workers=0, drop_last=True):
    sampler = ResumableSampler(n, rank=rank, world_size=world_size, seed=seed)
    return ResumableDataLoader(Numbers(n), batch_size=batch_size, sampler=sampler, collate_fn=_collate,
                               num_workers=num_workers, drop_last=drop_last)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_disjoint_equal_shards(drop_last):
    n, world = 23, 4
    samplers = [ResumableSampler(n, rank=r, world_size=world, seed=1, drop_last=drop_last) for r in range(world)]
    shards = [list(s) for s in samplers]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == samplers[0].samples_per_epoch
    seen = [i for shard in shards for i in shard]
    if drop_last:
        assert len(seen) == len(set(seen)) == 20
    else:
        assert set(seen) == set(range(n)) and len(seen) == 24  # one index repeated to even the shards


def test_epochs_are_seeded_and_differ():
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(ResumableSampler(50, shuffle=False)) == list(range(50))


def _run(loader, epochs, stop_after=None):
    """Batches of `epochs` epochs; with stop_after=k, stop (as a crash would) after k batches overall."""
    seen = []
    for epoch in range(loader.sampler.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            seen.append((epoch, batch["tokens"].tolist()))
            if stop_after is not None and len(seen) == stop_after:
                return seen
    return seen


@pytest.mark.parametrize("stop_after, num_workers", [(1, 0), (5, 0), (7, 0), (9, 0), (5, 2)])
def test_resume_sees_exactly_the_remaining_batches(stop_after, num_workers):
    """7 batches per epoch: stop mid-epoch, at the epoch's end, in epoch 2; with prefetching workers too."""
    reference = _run(_loader(num_workers=num_workers), epochs=2)
    assert len(reference) == 2 * 7
    first = _loader(num_workers=num_workers)
    before = _run(first, epochs=2, stop_after=stop_after)
    state = copy.deepcopy(first.state_dict())  # what the recipe saves in its checkpoint
    resumed = _loader(num_workers=num_workers)
    resumed.load_state_dict(state)
    after = _run(resumed, epochs=2)
    assert before + after == reference
    assert len(resumed) == 7 and resumed.batches_consumed == 7


def test_resume_across_ranks_and_a_new_world_size():
    """Two ranks stop after 2 batches; three ranks resume and read exactly the rest of the epoch's global order."""
    n, batch = 40, 2
    order = list(ResumableSampler(n, seed=5))
    loaders = [_loader(n, batch, rank=r, world_size=2, seed=5) for r in range(2)]
    iterators = [iter(loader) for loader in loaders]
    done = [next(it)["tokens"].tolist() for _ in range(2) for it in iterators]
    assert sorted(i for b in done for i in b) == sorted(order[:8])
    state = loaders[0].state_dict()
    assert state["consumed"] == 8 and loaders[1].state_dict() == state
    rest = []
    for r in range(3):
        loader = _loader(n, batch, rank=r, world_size=3, seed=5)
        loader.load_state_dict(state)
        rest.extend(i for b in loader for i in b["tokens"].tolist())
    assert sorted(rest) == sorted(order[8:8 + 30])  # 32 left, 30 = 3 ranks x 5 batches x 2 (drop_last)


def test_state_from_another_dataset_or_seed_is_refused():
    loader = _loader(seed=1)
    with pytest.raises(MytuneError, match="seed=2"):
        loader.load_state_dict({**loader.state_dict(), "seed": 2})
    with pytest.raises(MytuneError, match="num_samples"):
        loader.load_state_dict({**loader.state_dict(), "num_samples": 99})


def test_partial_last_batch_is_counted_without_drop_last():
    loader = _loader(n=7, batch_size=3, drop_last=False)
    assert len(loader) == 3
    assert [len(b["tokens"]) for b in loader] == [3, 3, 1]
    assert loader.sampler.consumed == 7 and list(loader.sampler) == []


def test_iterating_leaves_the_global_rng_alone():
    """A resumed run creates one more iterator than the uninterrupted run; neither may move the global torch RNG
    (dropout masks come from it)."""
    loader = ResumableDataLoader(list(range(12)), batch_size=2, sampler=ResumableSampler(12, rank=0, world_size=1))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    for _ in range(3):
        next(iter(loader))
    assert torch.equal(torch.rand(3), expected)


def test_a_batch_counts_its_items_not_the_rows_its_collate_makes():
    """A preference collate turns B pairs into 2B rows ([chosen; rejected]); the loader must count B items, or a
    resume skips half an epoch's data."""
    def two_rows_per_item(items):
        return {"tokens": torch.tensor([*items, *items])}

    sampler = ResumableSampler(40, rank=0, world_size=1, seed=0)
    loader = ResumableDataLoader(list(range(40)), batch_size=4, sampler=sampler, collate_fn=two_rows_per_item)
    for _, batch in zip(range(3), loader):
        assert batch["tokens"].shape[0] == 8
    assert loader.state_dict()["consumed"] == 12 and loader.batches_consumed == 3
