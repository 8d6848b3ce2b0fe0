"""The trainer's speed options change time and memory, not results (issue 24, item 4): activation
checkpointing, torch.compile and the AdamW kernels, each against the plain run on the same steps.

Both sides of every comparison run in float64 on one thread (as the DDP test does), so what is
left between them is the order of floating-point sums, and the tolerances follow from that:
- a gradient element is a sum of a few thousand products; in another order it moves by at most
  ~1e3 * 1.1e-16 of the sum of their magnitudes (< 1 here), so by < 1e-13;
- AdamW's update moves by at most lr / eps times a gradient error (its slope in g is below
  1 / eps, eps = 1e-8): 1e-3 / 1e-8 * 1e-13 = 1e-8 a step, < 3e-8 over 3 steps (weights: 1e-7);
- a loss is a mean of positive terms: relative 1e-10 covers the weights' change.
A broken option moves these by orders of magnitude more (a block skipped or recomputed with other
dropout changes the loss in the 3rd digit; a wrong AdamW formula changes the weights by ~lr).

An option that is silently ignored gives the plain run exactly, so each test also observes its
mechanism in the run that the config key drives: the bytes autograd keeps for the backward pass,
the calls of a counting compile backend, the AdamW kernels that ran; the sharded test counts the
elements each rank holds of the weights, the EMA and the AdamW moments.
"""

import os
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from training.config import apply_overrides, preset
from training.loop import train
from training.sharding import BYTES_PER_PARAMETER, wants_sharding
from training.synthetic import write_synthetic_shards
from numerics import float64_one_thread

MICRO = ["resolution_px=16", "model_channels=8", "context_dim=16", "channel_mult=1,2", "attention_levels=1",
         "num_heads=2", "log_every_steps=1000", "device=cpu", "batch_size=4", "warmup_steps=1",
         "checkpoint_every_steps=1000"]
TOLERANCE = {"weight_abs": 1e-7, "loss_rel": 1e-10}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from training.data import shard_paths

    out = tmp_path_factory.mktemp("speed")
    write_synthetic_shards(str(out), num_clips=8, num_frames=10, size_px=16, caption_dim=8)
    return shard_paths(str(out))


def run(paths, root, stage, *extra):
    with float64_one_thread():
        cfg = apply_overrides(preset(stage, "tiny"), MICRO + list(extra))
        return train(cfg, paths, str(root))


def assert_same_run(a, b):
    assert sorted(a.losses) == sorted(b.losses) and a.losses
    for step, loss in a.losses.items():
        assert b.losses[step] == pytest.approx(loss, rel=TOLERANCE["loss_rel"]), step
    for name, value in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[name], value, atol=TOLERANCE["weight_abs"], rtol=0)


def run_counting_saved_bytes(paths, root, stage, *extra):
    """run(), and the bytes of the tensors autograd kept for the backward passes of its steps
    (a checkpointed block's own are held by torch.utils.checkpoint's inner hooks: not counted)."""
    kept = 0

    def pack(t):
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run(paths, root, stage, *extra)
    return result, kept


def test_activation_checkpointing_gives_the_same_steps_and_keeps_less(paths, tmp_path):
    # The video stage (temporal layers too), with dropout: a recomputed block must replay the
    # same dropout mask (its RNG state is kept), or the gradients would not match the forward.
    extra = ["total_steps=3", "dropout=0.2"]
    plain, plain_kept = run_counting_saved_bytes(paths, tmp_path / "plain", "video", *extra)
    checkpointed, kept = run_counting_saved_bytes(paths, tmp_path / "ckpt", "video", *extra,
                                                  "activation_checkpointing=true")
    assert_same_run(plain, checkpointed)
    # Each block kept only its input; what is left is conv_in/out, the embeddings and the loss
    # (about 8% here: the shapes alone set it, so the margin to 1/4 holds on any machine).
    assert kept < plain_kept / 4, (kept, plain_kept)


@pytest.fixture(scope="module")
def counting_aot_eager() -> tuple[str, Counter]:
    """A torch.compile backend, by name: aot_eager, counting the graphs it compiles and the calls
    of what it compiled (registered once: dynamo refuses a second backend of the same name)."""
    from torch._dynamo import register_backend
    from torch._dynamo.backends.registry import lookup_backend

    counts = Counter()

    def backend(graph, example_inputs):
        counts["graphs"] += 1
        compiled_graph = lookup_backend("aot_eager")(graph, example_inputs)

        def counted(*args):
            counts["calls"] += 1
            return compiled_graph(*args)
        return counted

    register_backend(backend, name="counting_aot_eager")
    return "counting_aot_eager", counts


def test_compiled_network_gives_the_same_steps(paths, tmp_path, counting_aot_eager):
    # Backend aot_eager: TorchDynamo's graph capture and AOTAutograd's traced forward and
    # backward (where a compiled run can go wrong: graph breaks, functionalisation, the loss
    # of mutated state), without inductor's C++ code generation, which takes minutes on these
    # 2 cores; inductor's kernels (the default, `compile: auto` on CUDA) are timed by
    # bench/train_bench.py on a GPU.
    backend, counts = counting_aot_eager
    plain = run(paths, tmp_path / "plain", "image", "total_steps=2")
    compiled = run(paths, tmp_path / "compiled", "image", "total_steps=2", "compile=on",
                   f"compile_backend={backend}")
    assert_same_run(plain, compiled)
    # Every step's forward ran the compiled code (one graph a step; more if it broke into several).
    assert counts["calls"] >= 2, counts
    # The checkpoint holds the plain module's names (no compile wrapper in them).
    state = torch.load(compiled.last_checkpoint, weights_only=False)
    assert not [k for k in state["model"] if "_orig_mod" in k]


# The operator only torch.optim.adam's multi-tensor (foreach) or fused implementation calls; the
# per-parameter loop calls neither (gradient clipping's own foreach operators are others).
ADAMW_KERNEL = {"foreach": "_foreach_addcdiv_", "fused": "_fused_adamw_"}


class OperatorNames(TorchDispatchMode):
    """Records the name of every aten operator that runs inside it, and runs it unchanged."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def run_listing_adamw_kernels(paths, root, stage, *extra):
    """run(), and the AdamW implementations (ADAMW_KERNEL's keys) whose operators it called."""
    with OperatorNames() as ops:
        result = run(paths, root, stage, *extra)
    return result, {impl for impl, op in ADAMW_KERNEL.items() if op in ops.names}


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adamw_kernels_give_the_same_steps(paths, tmp_path, impl):
    loop, loop_kernels = run_listing_adamw_kernels(paths, tmp_path / "loop", "image", "total_steps=3",
                                                   "optimizer_impl=loop")
    other, other_kernels = run_listing_adamw_kernels(paths, tmp_path / impl, "image", "total_steps=3",
                                                     f"optimizer_impl={impl}")
    assert_same_run(loop, other)
    assert loop_kernels == set() and other_kernels == {impl}, (loop_kernels, other_kernels)


# ---- sharding (FSDP2) ---------------------------------------------------------------------------

SHARD_CFG = ["total_steps=5", "checkpoint_every_steps=2", "data_streams=2", "shuffle_buffer_rows=2"]


def held_of(tensors) -> tuple[int, int]:
    """(elements this rank holds, elements in all) of `tensors`: a DTensor holds its local shard,
    a plain tensor all of itself."""
    from torch.distributed.tensor import DTensor

    tensors = list(tensors)
    local = sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)
    return local, sum(t.numel() for t in tensors)


def _sharded_rank(rank: int, world: int, init_file: str, paths: list, root: str) -> None:
    """One gloo rank, weights sharded: an uninterrupted run, and the resume of a run that one
    process started (its step-2 checkpoint)."""
    import curation  # noqa: F401
    import torch.distributed as dist

    from training import sharding

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with float64_one_thread():
            cfg = apply_overrides(preset("video", "tiny"), MICRO + SHARD_CFG + ["sharding=fsdp"])
            full = train(cfg, paths, os.path.join(root, "sharded"))
            moments = [s[k] for s in full.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
            held = {"weights": held_of(full.model.parameters()), "ema": held_of(full.ema.parameters()),
                    "moments": held_of(moments)}
            resumed = train(cfg, paths, os.path.join(root, "one_then_sharded"))
        torch.save({"full": full.losses, "resumed": resumed.losses, "resumed_from": resumed.resumed_from_step,
                    "sharded": sharding.is_sharded(full.model), "held": held},
                   os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_ranks_match_one_process_and_checkpoints_move_between_them(paths, tmp_path):
    # The tolerances of the DDP test (tests/test_training_loop.py), for the same reason: both
    # sides in float64 on one thread; what differs is the order of the gradient sums.
    import shutil

    import torch.multiprocessing as mp

    # One process starts a run and is killed after step 3 (its last checkpoint: step 2).
    with float64_one_thread():
        cfg = apply_overrides(preset("video", "tiny"), MICRO + SHARD_CFG)
        train(cfg, paths, str(tmp_path / "one_then_sharded"), stop_after_step=3)
    mp.spawn(_sharded_rank, args=(2, str(tmp_path / "init"), paths, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single = run(paths, tmp_path / "single", "video", *SHARD_CFG)

    # The weights, the EMA and the AdamW moments (two a weight) were sharded: each rank held
    # about half of each (FSDP splits every tensor's first dimension; odd ones round up on rank 0).
    for r in ranks:
        assert r["sharded"] and r["held"]["moments"][1] == 2 * r["held"]["weights"][1], r["held"]
        for local, total in r["held"].values():
            assert 0.4 * total < local < 0.6 * total, r["held"]
    # The same losses as one process, step by step.
    for step in range(5):
        assert ranks[0]["full"][step] == ranks[1]["full"][step]
        assert ranks[0]["full"][step] == pytest.approx(single.losses[step], rel=TOLERANCE["loss_rel"])
    # The sharded run's checkpoint holds whole tensors: the single run's weights.
    sharded_final = torch.load(tmp_path / "sharded" / "checkpoint-0000005.pt", weights_only=True)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(sharded_final["model"][name], value, atol=TOLERANCE["weight_abs"], rtol=0)
    # One process's checkpoint resumed on 2 sharded ranks: from step 2, the uninterrupted losses.
    assert ranks[0]["resumed_from"] == 2
    for step in range(2, 5):
        assert ranks[0]["resumed"][step] == pytest.approx(single.losses[step], rel=TOLERANCE["loss_rel"])
    # The sharded ranks' step-2 checkpoint resumed by one process: the same.
    (tmp_path / "sharded_then_one").mkdir()
    shutil.copy(tmp_path / "sharded" / "checkpoint-0000002.pt", tmp_path / "sharded_then_one")
    resumed = run(paths, tmp_path / "sharded_then_one", "video", *SHARD_CFG)
    assert resumed.resumed_from_step == 2
    for step in range(2, 5):
        assert resumed.losses[step] == pytest.approx(single.losses[step], rel=TOLERANCE["loss_rel"])


def test_auto_shards_when_the_state_takes_over_a_third_of_the_gpu():
    # No GPU needed: the device memory is an argument, and a CUDA device object is only a name.
    model = torch.nn.Linear(10, 10)
    need = BYTES_PER_PARAMETER * (10 * 10 + 10)  # weights, gradients and AdamW moments
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for memory in (1, 10**15):  # the memory decides nothing in these cases
        assert not wants_sharding("fsdp", model, cuda, 1, memory)  # one rank: nothing to split over
        assert not wants_sharding("auto", model, cuda, 1, memory)
        assert not wants_sharding("ddp", model, cuda, 2, memory)
        assert wants_sharding("fsdp", model, cuda, 2, memory)
        assert wants_sharding("fsdp", model, cpu, 2, memory)
        assert not wants_sharding("auto", model, cpu, 2, memory)
    # auto on CUDA: sharded exactly when the state takes more than a third of the GPU.
    assert not wants_sharding("auto", model, cuda, 2, 3 * need)
    assert wants_sharding("auto", model, cuda, 2, 3 * need - 1)
