"""Stub of `datasets.distributed` for torchtune's import (see the package docstring)."""


def split_dataset_by_node(*args, **kwargs):
    raise ImportError("datasets is a stub on this PYTHONPATH (benchmarks/peer_stubs): no dataset can be split")
