"""Import torchao without its import-time noise, for the places that use it (NF4 for QLoRA, low-bit AdamW, float8)."""

import contextlib
import logging
from collections.abc import Iterator


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextlib.contextmanager
def quiet_torchao_import() -> Iterator[None]:
    """Drop, during the import only, the two log lines torchao's import emits on builds without its CUDA kernels.

    "Failed to load .../_C_*.so" (kernels this machine cannot load; NF4 and the low-bit optimizers do not use them)
    and torch's pytree notice about torchao registering an Enum. Every other record of those loggers comes through.
    """
    filters = [
        (logging.getLogger("torchao"), _DropMessages("Failed to load")),
        (logging.getLogger("torch.utils._pytree"), _DropMessages("is an Enum subclass and is now natively supported")),
    ]
    for logger, log_filter in filters:
        logger.addFilter(log_filter)
    try:
        yield
    finally:
        for logger, log_filter in filters:
            logger.removeFilter(log_filter)
