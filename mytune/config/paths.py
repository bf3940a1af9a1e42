"""Check, before any heavy work, that the input paths a params object names exist."""

import os
from pathlib import Path

from mytune.config.docs import field_docs


def find_missing_paths(params: object) -> list[str]:
    """One message per field in `type(params).INPUT_PATHS` that is set (non-empty) but names no existing path.

    The message names the field, the value and what the field expects (its doc comment), e.g.
    "checkpoint_dir: /x/y does not exist (set checkpoint_dir=... to a Hugging Face model directory ...)".
    """
    params_cls = type(params)
    missing = []
    docs: dict[str, str] | None = None
    for name in getattr(params_cls, "INPUT_PATHS", ()):
        value = getattr(params, name, None)
        if not isinstance(value, (str, os.PathLike)) or not str(value) or Path(value).exists():
            continue
        if docs is None:
            docs = field_docs(params_cls)
        expected = docs.get(name, "an existing file or directory")
        missing.append(f"{name}: {value} does not exist (set {name}=... to {expected})")
    return missing
