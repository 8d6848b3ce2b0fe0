"""Helpers for tests that compare two training runs to a tolerance derived from rounding."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def float64_one_thread():
    """Train in float64 on one thread: in float32, AdamW turns rounding into visible weight
    changes, and several threads sum in an order that changes from run to run."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
