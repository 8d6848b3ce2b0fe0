"""Sharded data parallelism: parameters, gradients and optimizer state split over the ranks
(PyTorch's FSDP2 `fully_shard`), for models whose AdamW state does not fit one GPU.

`sharding` in the config: `ddp` (every rank holds the whole model; gradients all-reduced),
`fsdp` (each U-Net block and the root sharded over all ranks: a block's weights are gathered for
its forward and backward and freed after, gradients reduce-scattered, each rank's AdamW updates
its own shard), or `auto`: fsdp when there is more than one rank on CUDA and the model's
weights, gradients and AdamW moments (16 bytes a parameter in float32) would take more than a
third of one GPU's memory, else ddp. The EMA copy is sharded the same way as the model.

Results: sharding changes where the numbers live and the order of gradient sums, nothing else;
the per-rank loss is the rank's sum over the nominal batch, and the reduce-scatter averages over
ranks as DDP's all-reduce does (tests/test_training_speed.py compares 2 sharded gloo ranks with
one process).

Checkpoints are always whole: the model's and the EMA's full state dicts (gathered to rank 0)
and the optimizer's state keyed by parameter name (`optimizer_state`), so a checkpoint written
by N sharded ranks resumes on M ranks, sharded or not, and one written by one process resumes
sharded. Checkpoints of format 1 (optimizer state keyed by position) still load unsharded.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = logging.getLogger(__name__)

BYTES_PER_PARAMETER = 16  # float32 weight, gradient and two AdamW moments
SHARD_ABOVE_GPU_SHARE = 1 / 3  # auto shards when that state takes more of one GPU's memory


def wants_sharding(sharding: str, model: torch.nn.Module, device: torch.device, world: int,
                   device_memory_bytes: int) -> bool:
    """Whether `sharding` (auto, ddp, fsdp) shards `model` over `world` ranks of `device`, each
    with `device_memory_bytes` (the caller asks the GPU, so that the rule can be checked
    without one)."""
    if world < 2 or sharding == "ddp":
        return False
    if sharding == "fsdp":
        return True
    if device.type != "cuda":
        return False
    need = BYTES_PER_PARAMETER * sum(p.numel() for p in model.parameters())
    return need > SHARD_ABOVE_GPU_SHARE * device_memory_bytes


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units of sharding: each block of the U-Net's encoder, middle and decoder."""
    return [*model.down, model.mid, *model.up]


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`fully_shard` every block, then the root (its remaining parameters: embeddings, conv_in/out),
    over all ranks of the default process group. In place; returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _options(model: torch.nn.Module) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict (sharded: gathered to rank 0, a collective every rank must call;
    the other ranks get an empty dict)."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=_options(model))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name (sharded: a collective, as above)."""
    return get_optimizer_state_dict(model, optimizer, options=_options(model))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         keyed_by_name: bool) -> None:
    """Load `optimizer_state`'s dict (or, `keyed_by_name` False, an `optimizer.state_dict()` of
    an unsharded run of checkpoint format 1)."""
    if not keyed_by_name:
        if is_sharded(model):
            raise ValueError("this checkpoint (format 1) resumes unsharded only: set sharding=ddp, "
                             "or resume it once with one process")
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def as_float(value: torch.Tensor) -> float:
    """A scalar that may be a DTensor (the gradient norm of a sharded model) as a float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)
