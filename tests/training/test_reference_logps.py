"""The preference recipes' reference model: a LoRA model with its adapters turned off is exactly its base (LoRA, DoRA,
QLoRA, compiled layers too), and precomputed reference log-probs equal per-batch ones, cached on disk under a key
that follows the data and the model, fed back by dataset index (also split over 2 processes)."""

import copy
import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mytune.data import preference_collate, preference_dataset_from_rows
from mytune.models import TransformerDecoder, model_args
from mytune.modules.lora import apply_lora, lora_layers
from mytune.tokenizers import load_tokenizer
from mytune.training.preference import sequence_logps
from mytune.training.reference_logps import (
    CACHE_SUBDIR,
    WithReferenceLogps,
    adapters_disabled,
    collate_with_reference,
    compute_reference_logps,
    reference_logps_for,
)

DEMO = Path(__file__).resolve().parents[2] / "mytune" / "assets" / "demo"
TOLERANCE = 1e-5


def tiny_model(seed: int = 0) -> TransformerDecoder:
    torch.manual_seed(seed)
    return TransformerDecoder(model_args("llama_tiny"))


def trained_lora(model: TransformerDecoder, **lora_kwargs) -> TransformerDecoder:
    """`model` with adapters whose update is far from zero (as after training): B and DoRA's magnitude randomised."""
    apply_lora(model, ["q_proj", "v_proj", "down_proj", "lm_head"], rank=4, alpha=8, **lora_kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.3)
            if layer.use_dora:
                layer.lora_magnitude_vector.mul_(1 + torch.rand(layer.out_features, generator=gen))
    return model


TOKENS = torch.randint(3, 512, (2, 19), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_disabled_is_the_base_model_bitwise(use_dora):
    base = tiny_model()
    model = trained_lora(copy.deepcopy(base), use_dora=use_dora, dropout=0.1)
    model.train()  # the adapters' dropout is skipped with them
    with torch.no_grad():
        expected, with_adapters = base(TOKENS), model(TOKENS)
        with adapters_disabled(model) as same:
            assert same is model
            off = model(TOKENS)
        model.eval()
        again = model(TOKENS)
    assert (with_adapters - expected).abs().max() > 0.1  # the adapters matter
    assert torch.equal(off, expected)
    with torch.no_grad():
        assert torch.equal(again, model.eval()(TOKENS)) and not torch.equal(again, expected)  # back on


def test_adapters_disabled_on_a_quantized_base_is_the_nf4_base():
    """QLoRA: off, each layer is its NF4 base alone: the same model with zero adapters (B = 0 adds exactly 0)."""
    model = trained_lora(tiny_model(), quantize_base=True)
    zeroed = trained_lora(tiny_model(), quantize_base=True)  # built again: torchao's NF4 clone loses its block sizes
    with torch.no_grad():
        for _, layer in lora_layers(zeroed):
            layer.lora_B.weight.zero_()
        expected = zeroed(TOKENS)
        with adapters_disabled(model):
            off = model(TOKENS)
    assert torch.equal(off, expected)


def test_adapters_come_back_after_an_exception():
    model = trained_lora(tiny_model())
    with torch.no_grad():
        before = model(TOKENS)
        with pytest.raises(RuntimeError, match="boom"), adapters_disabled(model):
            raise RuntimeError("boom")
        assert torch.equal(model(TOKENS), before)
    assert all("forward" not in layer.__dict__ for _, layer in lora_layers(model))


def test_adapters_disabled_reaches_compiled_layers():
    """torch.compile'd decoder layers (dynamo, "eager" backend) see the switch: its guards recompile, no stale graph."""
    from mytune.training.layer_wrappers import compile_layers

    base = tiny_model()
    model = compile_layers(trained_lora(copy.deepcopy(base)), backend="eager")
    try:
        with torch.no_grad():
            on = model(TOKENS)
            with adapters_disabled(model):
                off = model(TOKENS)
            on_again = model(TOKENS)
            expected = base(TOKENS)
    finally:
        torch._dynamo.reset()
    assert torch.equal(off, expected) and torch.equal(on_again, on) and not torch.equal(on, expected)


# ---- precomputed log-probs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO / "tokenizer.model")


@pytest.fixture(scope="module")
def pairs(tokenizer):
    """11 demo pairs (an odd number: a last batch smaller than the others, and uneven blocks over 2 ranks)."""
    rows = [json.loads(line) for line in (DEMO / "preference_demo.jsonl").read_text().splitlines()[:11]]
    return preference_dataset_from_rows(rows, tokenizer, max_seq_len=64)


def logps_fn(model: TransformerDecoder, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's chosen and rejected log-probs of a collated batch, as the recipes compute them."""
    hidden = model(batch["tokens"], return_hidden=True)
    logps, _ = sequence_logps(hidden, model.lm_head.weight, batch["labels"], chunk_size=16,
                              positions=batch["label_positions"])
    return logps.chunk(2)


def one_by_one(model, dataset, pad_id: int) -> torch.Tensor:
    """Each pair's log-probs from a batch of that pair alone."""
    with torch.no_grad():
        rows = [torch.stack(logps_fn(model, preference_collate([dataset[i]], pad_id=pad_id))).squeeze(-1)
                for i in range(len(dataset))]
    return torch.stack(rows)


def test_computed_table_equals_per_pair_log_probs(pairs, tokenizer):
    model = tiny_model()
    collate = partial(preference_collate, pad_id=tokenizer.pad_id)
    table = compute_reference_logps(pairs, partial(logps_fn, model), batch_size=4, collate=collate,
                                    device=torch.device("cpu"))
    expected = one_by_one(model, pairs, tokenizer.pad_id)
    error = (table - expected).abs().max().item()
    print(f"batched (4, padded) vs one pair per batch: max abs {error:.2e}")
    assert table.shape == (len(pairs), 2) and table.dtype == torch.float32
    assert error < TOLERANCE and (table < -1).all()  # real sums, row i for pair i


def test_cache_is_written_then_read_and_keyed_on_data_and_model(pairs, tokenizer, tmp_path, capsys):
    model = tiny_model()
    calls = []

    def counting(batch):
        calls.append(len(batch["tokens"]) // 2)
        return logps_fn(model, batch)

    lookup = partial(reference_logps_for, logps_fn=counting, cache_dir=tmp_path, batch_size=4,
                     collate=partial(preference_collate, pad_id=tokenizer.pad_id), device=torch.device("cpu"))
    first = lookup(pairs, model_identity={"checkpoint": ["model.safetensors:1:abc"], "dtype": "fp32"})
    assert sum(calls) == len(pairs) and "cached in" in capsys.readouterr().out
    files = list((tmp_path / CACHE_SUBDIR).glob("*.pt"))
    assert len(files) == 1

    calls.clear()
    again = lookup(pairs, model_identity={"checkpoint": ["model.safetensors:1:abc"], "dtype": "fp32"})
    assert not calls and torch.equal(again, first) and "read from" in capsys.readouterr().out

    # Another model, or other pairs (a validation split), are other entries.
    lookup(pairs, model_identity={"checkpoint": ["model.safetensors:1:def"], "dtype": "fp32"})
    subset = pairs.subset([3, 1, 4])
    part = lookup(subset, model_identity={"checkpoint": ["model.safetensors:1:abc"], "dtype": "fp32"})
    assert (part - first[[3, 1, 4]]).abs().max() < TOLERANCE  # by index: the same pairs, batched differently
    assert len(list((tmp_path / CACHE_SUBDIR).glob("*.pt"))) == 3


def test_damaged_or_mismatched_cache_entries_are_computed_again(pairs, tokenizer, tmp_path, capsys):
    model = tiny_model()
    lookup = partial(reference_logps_for, logps_fn=partial(logps_fn, model), cache_dir=tmp_path, batch_size=4,
                     collate=partial(preference_collate, pad_id=tokenizer.pad_id), device=torch.device("cpu"),
                     model_identity={"m": 1})
    expected = lookup(pairs)
    (path,) = (tmp_path / CACHE_SUBDIR).glob("*.pt")
    for damage in (lambda: path.write_bytes(b"not a tensor"), lambda: torch.save(torch.zeros(3, 2), path),
                   lambda: torch.save(torch.full((len(pairs), 2), float("nan")), path)):
        damage()
        assert torch.equal(lookup(pairs), expected)
        assert "computing it again" in capsys.readouterr().err
        assert torch.equal(torch.load(path, weights_only=True), expected)  # rewritten


def test_unwritable_cache_warns_and_the_values_are_still_returned(pairs, tokenizer, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    table = reference_logps_for(pairs, partial(logps_fn, tiny_model()), cache_dir=blocker, model_identity={},
                                batch_size=4, collate=partial(preference_collate, pad_id=tokenizer.pad_id),
                                device=torch.device("cpu"))
    assert table.shape == (len(pairs), 2)
    assert "reference log-prob cache not written" in capsys.readouterr().err


def test_items_carry_their_pair_into_the_batch(pairs, tokenizer):
    table = torch.arange(2 * len(pairs), dtype=torch.float32).view(-1, 2)
    dataset = WithReferenceLogps(pairs, table)
    assert len(dataset) == len(pairs) and dataset.num_samples == len(pairs) and dataset.summary() == pairs.summary()
    collate = partial(preference_collate, pad_id=tokenizer.pad_id)
    batch = collate_with_reference([dataset[5], dataset[2]], collate=collate)
    plain = collate([pairs[5], pairs[2]])
    assert batch["reference_chosen_logps"].tolist() == [10.0, 4.0]
    assert batch["reference_rejected_logps"].tolist() == [11.0, 5.0]
    assert all(torch.equal(batch[k], plain[k]) for k in plain)
    assert collate_with_reference([pairs[0]], collate=collate).keys() == plain.keys()
    with pytest.raises(ValueError, match="3 reference log-prob pairs for 11 items"):
        WithReferenceLogps(pairs, table[:3])


def _two_rank_worker(rank: int, init_file: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        tokenizer = load_tokenizer(DEMO / "tokenizer.model")
        rows = [json.loads(line) for line in (DEMO / "preference_demo.jsonl").read_text().splitlines()[:11]]
        pairs = preference_dataset_from_rows(rows, tokenizer, max_seq_len=64)
        model = tiny_model()
        calls = []

        def counting(batch):
            calls.append(len(batch["tokens"]) // 2)
            return logps_fn(model, batch)

        cache = Path(out) / "cache"
        collate = partial(preference_collate, pad_id=tokenizer.pad_id)
        table = reference_logps_for(pairs, counting, cache_dir=cache, model_identity={"m": 1}, batch_size=4,
                                    collate=collate, device=torch.device("cpu"), rank=rank, world_size=2)
        n_computed = len(calls)
        dist.barrier()
        again = reference_logps_for(pairs, counting, cache_dir=cache, model_identity={"m": 1}, batch_size=4,
                                    collate=collate, device=torch.device("cpu"), rank=rank, world_size=2)
        torch.save({"table": table, "again": again, "calls": n_computed, "calls_after": len(calls)},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_compute_one_block_each_and_share_the_cached_table(pairs, tokenizer, tmp_path):
    """11 pairs over 2 ranks: blocks of 6 (the second padded with a repeat), the same number of forwards on both
    ranks, both end with the whole table (== one process's), and a second lookup reads rank 0's cache on both."""
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = one_by_one(tiny_model(), pairs, tokenizer.pad_id)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in results:
        assert (result["table"] - expected).abs().max() < TOLERANCE
        assert torch.equal(result["again"], result["table"]) and result["calls_after"] == result["calls"]
    assert torch.equal(results[0]["table"], results[1]["table"])
    assert results[0]["calls"] == results[1]["calls"] == 2  # 6 pairs each, batches of 4: 2 forwards per rank
