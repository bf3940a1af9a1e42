"""Dataset mixes: several sources drawn by weight with a seeded generator, resumable exactly mid-epoch, each source
with its own format and column map; per-source params validated in one line; a tiny recipe run trains on a mix."""

import json
import math
import re

import numpy as np
import pytest

from mytune.data import (
    MixedDataset,
    ResumableDataLoader,
    ResumableSampler,
    build_dataset_mix,
    build_sft_dataset,
    split_validation,
)
from mytune.errors import ConfigError, MytuneError

SIZES = (1000, 300, 50)
WEIGHTS = (0.7, 0.2, 0.1)


def _mix(weights=WEIGHTS, sizes=SIZES):
    """Sources whose items are (source, index) pairs, so every draw says where it came from."""
    sources = [[(s, i) for i in range(size)] for s, size in enumerate(sizes)]
    return MixedDataset(sources, [f"source{s}" for s in range(len(sizes))], weights)


def _epoch_sources(mix, seed, epochs):
    sampler = ResumableSampler(mix, rank=0, world_size=1, seed=seed)
    drawn = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        drawn.extend(mix.source_of(sampler.rank_indices()).tolist())
    return np.asarray(drawn)


def test_each_source_is_drawn_in_proportion_to_its_weight():
    mix = _mix()
    drawn = _epoch_sources(mix, seed=0, epochs=3)
    assert len(drawn) == 3 * sum(SIZES)  # an epoch is as long as the concatenation
    n = len(drawn)
    for source, weight in enumerate(WEIGHTS):
        p = weight / sum(WEIGHTS)
        tolerance = 4 * math.sqrt(p * (1 - p) / n)  # four binomial standard deviations
        assert abs(np.mean(drawn == source) - p) < tolerance, (source, np.mean(drawn == source), p)


def test_a_small_source_repeats_no_item_before_all_of_it_was_seen():
    mix = _mix()
    sampler = ResumableSampler(mix, rank=0, world_size=1, seed=3)
    order = sampler.rank_indices()
    small = order[mix.source_of(order) == 2] - mix.starts[2]
    size = SIZES[2]
    assert len(small) > size  # weight 0.1 of 1350 draws upsamples the 50 items
    assert sorted(small[:size].tolist()) == list(range(size))
    assert sorted(small[size:2 * size].tolist()) == list(range(size))


def test_the_order_is_seeded_and_changes_per_epoch_and_seed():
    mix = _mix()

    def order(seed, epoch):
        sampler = ResumableSampler(mix, rank=0, world_size=1, seed=seed)
        sampler.set_epoch(epoch)
        return sampler.rank_indices().tolist()

    assert order(0, 0) == order(0, 0) == mix.epoch_order(0, 0).tolist()
    assert order(0, 0) != order(1, 0) and order(0, 0) != order(0, 1)
    assert all(mix[i][0] == s for i, s in zip(order(0, 0)[:50], mix.source_of(order(0, 0)[:50])))


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_mid_epoch_continues_identically(world_size):
    """Rank-sharded loaders stop after 7 batches; loaders built from the saved state yield the same items as an
    uninterrupted run of two epochs."""
    mix = _mix()
    batch_size = 16

    def loaders():
        return [ResumableDataLoader(mix, batch_size=batch_size, collate_fn=list,
                                    sampler=ResumableSampler(mix, rank=r, world_size=world_size, seed=5))
                for r in range(world_size)]

    def run(group, epochs, stop_after=None):
        seen = [[] for _ in group]
        for epoch in epochs:
            iterators = []
            for loader in group:
                loader.set_epoch(epoch)
                iterators.append(iter(loader))
            for step in range(len(group[0]) - group[0].batches_consumed):
                if stop_after is not None and step == stop_after:
                    return seen
                for rank, iterator in enumerate(iterators):
                    seen[rank].extend(next(iterator))
        return seen

    expected = run(loaders(), epochs=(0, 1))
    first = loaders()
    before = run(first, epochs=(0,), stop_after=7)
    states = [loader.state_dict() for loader in first]
    assert states[0]["mix_weights"] == list(WEIGHTS) and states[0]["consumed"] == 7 * batch_size * world_size
    resumed = loaders()
    for loader, state in zip(resumed, states):
        loader.load_state_dict(state)
    after = run(resumed, epochs=(0, 1))
    assert [b + a for b, a in zip(before, after)] == expected


def test_resuming_with_other_weights_or_without_the_mix_is_refused():
    state = ResumableSampler(_mix(), rank=0, world_size=1).state_dict()
    with pytest.raises(MytuneError, match="mix_weights"):
        ResumableSampler(_mix(weights=(0.5, 0.3, 0.2)), rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(MytuneError, match="mix_weights"):
        ResumableSampler(sum(SIZES), rank=0, world_size=1).load_state_dict(state)
    plain = ResumableSampler(sum(SIZES), rank=0, world_size=1).state_dict()  # saved by a run without a mix
    with pytest.raises(MytuneError, match="mix_weights=None but this run has"):  # one line, not KeyError
        ResumableSampler(_mix(), rank=0, world_size=1).load_state_dict(plain)


def test_without_weights_the_mix_is_the_plain_concatenation():
    mix = _mix(weights=None)
    plain = ResumableSampler(sum(SIZES), seed=2).rank_indices().tolist()
    assert ResumableSampler(mix, seed=2).rank_indices().tolist() == plain
    assert [mix[i] for i in (0, 999, 1000, 1349)] == [(0, 0), (0, 999), (1, 0), (2, 49)]


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_each_source_has_its_own_format_and_column_map(tmp_path, char_tokenizer):
    qa = _write(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)])
    chat = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"u{i}"},
                                                         {"role": "assistant", "content": f"r{i}"}]}
                                            for i in range(4)])
    build = lambda path, **kw: build_sft_dataset(path, char_tokenizer, max_seq_len=256, **kw)  # noqa: E731
    mix = build_dataset_mix(build, [str(qa), str(chat)], weights=[3, 1], formats=["instruct", "auto"],
                            column_maps=[{"instruction": "question", "output": "answer"}, {}])
    alone_qa = build(qa, dataset_format="instruct", column_map={"instruction": "question", "output": "answer"})
    alone_chat = build(chat)
    assert len(mix) == 10 and mix.mix_weights == [3.0, 1.0]
    assert [mix[i] for i in range(10)] == [alone_qa[i] for i in range(6)] + [alone_chat[i] for i in range(4)]
    assert "mix of 2 sources (weighted)" in mix.summary() and "(75%)" in mix.summary()

    train, val = split_validation(mix, 0.25, seed=0)  # each source split on its own
    assert (len(train), len(val)) == (7, 3) and train.mix_weights == [3.0, 1.0] and val.mix_weights is None
    assert build_dataset_mix(build, str(chat)).num_samples == 4  # one source: the plain SFTDataset


@pytest.mark.parametrize("overrides, message", [
    ({"dataset_weights": [1.0]}, "dataset_weights has 1 entries but dataset_path names 2 sources"),
    ({"dataset_weights": [1.0, 0.0]}, "dataset_weights[1] must be a positive finite number"),
    ({"dataset_weights": [1.0, float("inf")]}, "dataset_weights[1] must be a positive finite number"),
    ({"dataset_formats": ["chat"]}, "dataset_formats has 1 entries"),
    ({"dataset_formats": ["chat", "csv"]}, "dataset_formats[1] must be auto, instruct, chat or text"),
    ({"column_maps": [{}, {"answer": "x"}]}, "column_maps[1]: 'answer'"),
    ({"column_maps": [{}]}, "column_maps has 1 entries"),
])
def test_mix_params_are_validated_in_one_line(overrides, message):
    from recipes.params.full_finetune_single_device import FullFinetuneParams

    with pytest.raises(ConfigError) as info:
        FullFinetuneParams(model="llama_tiny", tokenizer_path="t", dataset_path=["a.jsonl", "b.jsonl"], **overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_command_line_list_and_single_path_both_parse():
    from mytune.config import TuneArgumentParser
    from recipes.params.full_finetune_single_device import FullFinetuneParams

    parser = TuneArgumentParser(FullFinetuneParams, recipe="full_finetune_single_device")
    base = ["--override", "model=llama_tiny", "tokenizer_path=t"]
    mixed = parser.parse_params([*base, "dataset_path=[a.jsonl, owner/name]", "dataset_weights=[0.7,0.3]",
                                 "dataset_formats=[instruct,chat]"])
    assert (mixed.dataset_path, mixed.dataset_weights, mixed.dataset_formats) == (
        ["a.jsonl", "owner/name"], [0.7, 0.3], ["instruct", "chat"])
    assert parser.parse_params([*base, "dataset_path=a.jsonl"]).dataset_path == "a.jsonl"


def test_recipe_trains_and_resumes_on_a_mix_of_two_files(tmp_path, capsys):
    """The tiny demo recipe on the demo alpaca file mixed 3:1 with a chat file of other column names: 4 steps saving
    at step 2, and a run resumed from step_2 logs the same losses for steps 3-4 (the mix resumes exactly)."""
    from mytune.training.metrics import read_metrics
    from recipes import full_finetune_single_device as recipe
    from tests.recipes.test_full_finetune_single_device import DEMO, demo_params

    chat = _write(tmp_path / "chat.jsonl", [
        {"dialog": [{"from": "human", "value": f"Say {word}."}, {"from": "gpt", "value": f"{word}!"}]}
        for word in ("one", "two", "three", "four", "five", "six", "seven", "eight") * 4])
    run = [f"dataset_path=[{DEMO / 'alpaca_demo.jsonl'}, {chat}]", "dataset_weights=[3, 1]",
           "dataset_formats=[instruct, chat]", "column_maps=[{}, {conversations: dialog}]", "max_steps_per_epoch=4",
           "epochs=1", "save_every_n_steps=2", "val_fraction=0", "eval_every_n_steps=0"]
    reference = tmp_path / "reference"
    recipe.recipe_main(demo_params(reference, *run))
    out = capsys.readouterr().out
    assert re.search(r"dataset_path: mix of 2 sources \(weighted\): .*alpaca_demo\.jsonl \(75%\): \d+ samples.*"
                     r"chat\.jsonl \(25%\): 32 samples", out), out
    expected = {r["step"]: r["loss"] for r in read_metrics(reference / "metrics.jsonl")}
    assert sorted(expected) == [1, 2, 3, 4] and all(math.isfinite(loss) for loss in expected.values())

    resumed = tmp_path / "resumed"
    recipe.recipe_main(demo_params(resumed, *run, f"resume_from_checkpoint={reference / 'step_2'}"))
    got = {r["step"]: r["loss"] for r in read_metrics(resumed / "metrics.jsonl")}
    assert got == {step: loss for step, loss in expected.items() if step > 2}


@pytest.mark.parametrize("recipe_name", ["lora_finetune_single_device", "full_finetune_distributed",
                                         "lora_finetune_distributed"])
def test_other_recipes_train_on_a_packed_mix_with_a_validation_split(recipe_name, tmp_path):
    """The other three recipes (the distributed ones as a world of one) on a weighted, packed mix of two files with
    per-source formats and val_fraction: the validation split is taken from each source, and training runs."""
    import importlib

    from mytune.config import TuneArgumentParser
    from mytune.training.distributed import destroy_distributed
    from mytune.training.metrics import read_metrics
    from tests.recipes.test_full_finetune_single_device import DEMO

    module = importlib.import_module(f"recipes.{recipe_name}")
    params_module = importlib.import_module(f"recipes.params.{recipe_name}")
    params_cls = next(v for k, v in vars(params_module).items() if k.endswith("Params") and isinstance(v, type)
                      and v.__module__ == params_module.__name__)
    recipe_cls = next(v for k, v in vars(module).items() if k.endswith(("Recipe", "Distributed", "SingleDevice"))
                      and isinstance(v, type) and v.__module__ == module.__name__)
    chat = _write(tmp_path / "chat.jsonl", [
        {"dialog": [{"from": "human", "value": f"Say {word}."}, {"from": "gpt", "value": f"{word}!"}]}
        for word in ("one", "two", "three", "four") * 5])
    parser = TuneArgumentParser(params_cls, recipe=recipe_name)
    params = parser.parse_params([
        "--config", "tiny_demo", "--override", f"output_dir={tmp_path / 'out'}", f"dataset_cache_dir={tmp_path / 'c'}",
        f"dataset_path=[{DEMO / 'alpaca_demo.jsonl'}, {chat}]", "dataset_weights=[3, 1]",
        "dataset_formats=[instruct, chat]", "column_maps=[{}, {conversations: dialog}]", "packed=true",
        "val_fraction=0.1", "max_eval_batches=2", "batch_size=2", "max_steps_per_epoch=2", "epochs=1",
        "log_every_n_steps=1", "dtype=fp32"])
    recipe = recipe_cls(params)
    try:
        recipe.setup()
        assert isinstance(recipe.dataloader.dataset, MixedDataset) and recipe.dataloader.dataset.mix_weights == [3, 1]
        demo_rows = len((DEMO / "alpaca_demo.jsonl").read_text().splitlines())
        assert recipe.val_dataloader.dataset.num_samples == round(0.1 * demo_rows) + round(0.1 * 20)  # per source
        recipe.train()
        recipe.cleanup()
    finally:
        destroy_distributed()
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert math.isfinite(rows[-1]["val_loss"])


def test_a_missing_source_of_a_mix_is_named_before_any_work(tmp_path):
    from mytune.config import find_missing_paths
    from recipes.params.full_finetune_single_device import FullFinetuneParams

    present = tmp_path / "a.jsonl"
    present.write_text('{"instruction": "x", "output": "y"}\n')
    params = FullFinetuneParams(model="llama_tiny", tokenizer_path=str(present), output_dir=str(tmp_path / "out"),
                                dataset_path=[str(present), str(tmp_path / "gone.jsonl"), "owner/name"])
    (message,) = find_missing_paths(params)  # the hub name is not a missing path
    assert message.startswith(f"dataset_path: {tmp_path / 'gone.jsonl'} does not exist (set dataset_path=... to ")
