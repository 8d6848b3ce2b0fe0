"""Where and how wide a model stage runs torch: the `device` and `torch_threads` arguments.

The constructor checks both arguments (validate_device_args, cheap, no torch import);
setup() resolves them (resolve_device, set_torch_threads) once per worker.
"""

from __future__ import annotations

import os


def validate_device_args(device: str, torch_threads: int | None) -> None:
    """ValueError naming `device` or `torch_threads` when either is not a valid value."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if torch_threads is not None and torch_threads < 1:
        raise ValueError(f"torch_threads must be >= 1 (or null: follow OMP_NUM_THREADS), got {torch_threads}")


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cuda" without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but torch sees no GPU in this process: set the "
                           "step's device to auto (the CPU where there is no GPU), or give the step "
                           "ray.num_gpus on a cluster whose nodes have GPUs")
    return device


def set_torch_threads(torch_threads: int | None) -> int:
    """Set torch's intra-op threads; None follows OMP_NUM_THREADS (Ray sets it to num_cpus).

    Without this a worker with num_cpus=1 would still start one thread per core and fight
    the other actors on the same node. Returns the thread count torch now uses.
    """
    import torch

    if torch_threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        torch_threads = int(env) if env.isdigit() and int(env) > 0 else None
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    return torch.get_num_threads()
