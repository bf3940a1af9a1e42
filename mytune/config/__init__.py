"""YAML configs + `--override key=value` -> typed params dataclasses, with one-line errors."""

from mytune.config.parser import TuneArgumentParser
from mytune.config.paths import find_missing_paths, require_input_paths

__all__ = ["TuneArgumentParser", "find_missing_paths", "require_input_paths"]
