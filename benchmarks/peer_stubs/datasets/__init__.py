"""A stand-in for Hugging Face `datasets`, on torchtune's PYTHONPATH only (see benchmarks/README.md).

torchtune 0.6 imports `datasets` at module level (its dataset builders) although the benchmark never loads a dataset
through it; this stub satisfies those imports without installing `datasets` and its dependencies anywhere.
"""


class Dataset:
    """Only a name for torchtune's type hints and isinstance checks."""


def load_dataset(*args, **kwargs):
    raise ImportError("datasets is a stub on this PYTHONPATH (benchmarks/peer_stubs): no dataset can be loaded")
