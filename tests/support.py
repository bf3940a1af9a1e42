"""Helpers several test files share: the one-line error check and a tiny single-device full fine-tune."""

from pathlib import Path

import pytest

from mytune.config import TuneArgumentParser
from mytune.errors import MytuneError

# A seconds-long full_finetune_single_device run on the demo: short rows, fp32, every step logged, nothing pruned.
TINY_FULL_RUN = ["max_seq_len=64", "epochs=1", "dtype=fp32", "log_every_n_steps=1", "val_fraction=0",
                 "eval_every_n_steps=0", "keep_last_n_checkpoints=null", "lr_scheduler=constant", "warmup_steps=0"]


def tiny_full_params(output_dir: Path, cache: Path, *overrides: str):
    """`FullFinetuneParams` of the tiny_demo config with `TINY_FULL_RUN` and `overrides`, as a user would parse them."""
    from recipes.params.full_finetune_single_device import FullFinetuneParams

    parser = TuneArgumentParser(FullFinetuneParams, recipe="full_finetune_single_device")
    return parser.parse_params(["--config", "tiny_demo", "--override", f"output_dir={output_dir}",
                                f"dataset_cache_dir={cache}", *TINY_FULL_RUN, *overrides])


def one_line_error(fn, *args, **kwargs) -> str:
    """Call `fn`, which must raise a MytuneError whose message is one line; print and return that line."""
    with pytest.raises(MytuneError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    print(message)
    assert "\n" not in message
    return message
