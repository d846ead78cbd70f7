"""Datasets and resumable batch order."""
from ddt.data.digits import load_digits
from ddt.data.order import batch_indices

__all__ = ["load_digits", "batch_indices"]
