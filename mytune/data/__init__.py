"""Datasets for fine-tuning: sources, formats, prompt templates, tokenization cache, packing, sampling, collation.

Recipes call:

    dataset = build_sft_dataset(path, tokenizer, max_seq_len=..., packed=..., cache_dir=...)
    train, val = split_validation(dataset, val_fraction, seed=seed)       # or build_sft_dataset(dataset_val, ...)
    sampler = ResumableSampler(train, rank=rank, world_size=world_size, seed=seed, shuffle=True)
    loader = ResumableDataLoader(train, batch_size=..., sampler=sampler,
                                 collate_fn=partial(padded_collate, pad_id=tokenizer.pad_id))
    loader.set_epoch(epoch); for batch in loader: ...; checkpoint["dataloader"] = loader.state_dict()

Batches: `tokens`, `labels` (not shifted; -100 = no loss) `[b, s]`, and for packed datasets `position_ids` and
`document_ids` `[b, s]` (see `mytune.data.packing` for the attention contract).
"""

from mytune.data.cache import default_cache_dir
from mytune.data.collate import padded_collate
from mytune.data.formats import DATASET_FORMATS, Example, RowError, detect_format
from mytune.data.instruct import InstructDataset, InstructTokenizer
from mytune.data.mix import MixedDataset, build_dataset_mix, dataset_sources
from mytune.data.packing import document_attention_mask, greedy_pack
from mytune.data.preference import (
    PreferenceDataset,
    build_preference_dataset,
    preference_collate,
    preference_dataset_from_rows,
)
from mytune.data.rows import RowTable, load_rows, read_rows
from mytune.data.sampler import ResumableDataLoader, ResumableSampler
from mytune.data.sft import (
    CROSS_ENTROPY_IGNORE_INDEX,
    SFTDataset,
    build_sft_dataset,
    sft_dataset_from_rows,
    split_validation,
)
from mytune.data.templates import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    BUILTIN_TEMPLATES,
    CHATML_JINJA,
    LLAMA2_JINJA,
    LLAMA3_JINJA,
    PromptRenderer,
    Rendered,
    alpaca_prompt,
)

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "BUILTIN_TEMPLATES",
    "CHATML_JINJA",
    "CROSS_ENTROPY_IGNORE_INDEX",
    "DATASET_FORMATS",
    "Example",
    "InstructDataset",
    "InstructTokenizer",
    "LLAMA2_JINJA",
    "LLAMA3_JINJA",
    "MixedDataset",
    "PreferenceDataset",
    "PromptRenderer",
    "Rendered",
    "ResumableDataLoader",
    "ResumableSampler",
    "RowError",
    "RowTable",
    "SFTDataset",
    "alpaca_prompt",
    "build_dataset_mix",
    "build_preference_dataset",
    "build_sft_dataset",
    "dataset_sources",
    "default_cache_dir",
    "detect_format",
    "document_attention_mask",
    "greedy_pack",
    "load_rows",
    "padded_collate",
    "preference_collate",
    "preference_dataset_from_rows",
    "read_rows",
    "sft_dataset_from_rows",
    "split_validation",
]
