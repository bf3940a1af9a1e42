"""Check, before any heavy work, that the input paths a params object names exist."""

import os
import re
import shlex
from pathlib import Path

from mytune.config.docs import field_docs
from mytune.errors import MytuneError


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet")


def looks_like_hub_dataset(value: str) -> bool:
    """`owner/name` that is no local path and no data file name: a Hugging Face hub dataset."""
    local_file = Path(value).suffix in DATA_FILE_SUFFIXES
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", value)) and not local_file and not Path(value).exists()


def find_missing_paths(params: object) -> list[str]:
    """One message per field in `type(params).INPUT_PATHS` that is set (non-empty) but names no existing path.

    The message names the field, the value and what the field expects (its doc comment), e.g.
    "checkpoint_dir: /x/y does not exist (set checkpoint_dir=... to a Hugging Face model directory ...)", ending
    with the `mytune download <hub_repo> --output-dir /x/y` command when the params name their hub repo.
    Fields in `HUB_DATASET_FIELDS` may instead name a hub dataset (`owner/name`), which is not a missing path.
    """
    params_cls = type(params)
    hub_fields = getattr(params_cls, "HUB_DATASET_FIELDS", ())
    missing = []
    docs: dict[str, str] | None = None
    for name in getattr(params_cls, "INPUT_PATHS", ()):
        value = getattr(params, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]  # a dataset mix names several sources
        for value in values:
            if not isinstance(value, (str, os.PathLike)) or not str(value) or Path(value).exists():
                continue
            if name in hub_fields and looks_like_hub_dataset(str(value)):
                continue
            if docs is None:
                docs = field_docs(params_cls)
            expected = docs.get(name, "an existing file or directory")
            missing.append(f"{name}: {value} does not exist (set {name}=... to {expected})"
                           + _download_hint(params, name) + _earlier_run_hint(value))
    return missing


def _earlier_run_hint(value: str | os.PathLike) -> str:
    """A missing `<output_dir>/step_<N>` is what an earlier run writes (the DPO demo starts from the SFT demo's)."""
    path = Path(value)
    if not re.fullmatch(r"step_\d+", path.name):
        return ""
    return (f"; it is a checkpoint a fine-tuning run writes into its output_dir {path.parent}: run that recipe first "
            f"(the config's header says which), from this directory")


def _download_hint(params: object, name: str) -> str:
    """For a missing checkpoint_dir of a config that names its hub repo (`hub_repo`): the command that fetches it."""
    repo = getattr(params, "hub_repo", "")
    if name != "checkpoint_dir" or not repo:
        return ""
    return f"; to download it: mytune download {repo} --output-dir {shlex.quote(str(getattr(params, name)))}"


def require_input_paths(params: object) -> None:
    """Raise MytuneError with the first of `find_missing_paths(params)`: checked before any heavy work starts."""
    missing = find_missing_paths(params)
    if missing:
        raise MytuneError(missing[0])
