"""mytune: native-PyTorch LLM fine-tuning recipes with a `tune`-like command line.

Importing `mytune` is light (no torch, no transformers), so `mytune ls` and `--help` answer at once.
"""

from mytune.config import TuneArgumentParser

__version__ = "0.1.0"

__all__ = ["TuneArgumentParser", "__version__"]
