"""The shape every recipe has: a class with these five methods, driven by a `recipe_main(params)` function.

A Protocol, not a base class: recipes share no implementation, so a user can copy one file and change anything.
"""

from pathlib import Path
from typing import Protocol


class FTRecipeInterface(Protocol):
    def load_checkpoint(self) -> None:
        """Build the model (and tokenizer) and load the starting weights."""

    def setup(self) -> None:
        """Everything training needs: model, optimizer, data, schedule, loggers."""

    def train(self) -> None:
        """The training loop."""

    def save_checkpoint(self) -> Path:
        """Write the current weights in Hugging Face format; return the directory."""

    def cleanup(self) -> None:
        """Close loggers and release resources."""
