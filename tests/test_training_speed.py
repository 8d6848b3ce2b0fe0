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
"""

import os

import pytest
import torch

from training import diffusion
from training.config import apply_overrides, preset
from training.loop import model_from_config, train
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


def test_activation_checkpointing_gives_the_same_steps(paths, tmp_path):
    # The video stage (temporal layers too), with dropout: a recomputed block must replay the
    # same dropout mask (its RNG state is kept), or the gradients would not match the forward.
    extra = ["total_steps=3", "dropout=0.2"]
    plain = run(paths, tmp_path / "plain", "video", *extra)
    checkpointed = run(paths, tmp_path / "ckpt", "video", *extra, "activation_checkpointing=true")
    assert_same_run(plain, checkpointed)


def saved_bytes(model, x, sigma, noise, caption) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        diffusion.edm_loss(model, x, sigma, noise, 0.5, caption=caption).mean()
    return total


def test_activation_checkpointing_keeps_less_for_the_backward_pass():
    torch.manual_seed(0)
    cfg = apply_overrides(preset("video", "tiny"), MICRO + ["caption_dim=8", "resolution_px=32"])
    model = model_from_config(cfg, 3)
    x, noise = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 3, 4, 32, 32)
    args = (x, torch.ones(2), noise, torch.randn(2, 8))
    full = saved_bytes(model, *args)
    model.checkpointing = True
    kept = saved_bytes(model, *args)
    # Each block keeps only its inputs; what is left is conv_in/out and the embeddings.
    assert kept < full / 4, (kept, full)
    with torch.no_grad():  # and no recomputation outside training: the same output
        model.checkpointing = False
        a = model(x, torch.ones(2), caption=args[3])
        model.checkpointing = True
        b = model(x, torch.ones(2), caption=args[3])
    assert torch.equal(a, b)


def test_compiled_network_gives_the_same_steps(paths, tmp_path):
    # Backend aot_eager: TorchDynamo's graph capture and AOTAutograd's traced forward and
    # backward (where a compiled run can go wrong: graph breaks, functionalisation, the loss
    # of mutated state), without inductor's C++ code generation, which takes minutes on these
    # 2 cores; inductor's kernels (the default, `compile: auto` on CUDA) are timed by
    # bench/train_bench.py on a GPU.
    plain = run(paths, tmp_path / "plain", "image", "total_steps=2")
    compiled = run(paths, tmp_path / "compiled", "image", "total_steps=2", "compile=on",
                   "compile_backend=aot_eager")
    assert_same_run(plain, compiled)
    # The checkpoint holds the plain module's names (no compile wrapper in them).
    state = torch.load(compiled.last_checkpoint, weights_only=False)
    assert not [k for k in state["model"] if "_orig_mod" in k]


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adamw_kernels_give_the_same_steps(paths, tmp_path, impl):
    loop = run(paths, tmp_path / "loop", "image", "total_steps=3", "optimizer_impl=loop")
    other = run(paths, tmp_path / impl, "image", "total_steps=3", f"optimizer_impl={impl}")
    assert_same_run(loop, other)


# ---- sharding (FSDP2) ---------------------------------------------------------------------------

SHARD_CFG = ["total_steps=5", "checkpoint_every_steps=2", "data_streams=2", "shuffle_buffer_rows=2"]


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
            local = sum(p.to_local().numel() for p in full.model.parameters())
            total = sum(p.numel() for p in full.model.parameters())
            resumed = train(cfg, paths, os.path.join(root, "one_then_sharded"))
        torch.save({"full": full.losses, "resumed": resumed.losses, "resumed_from": resumed.resumed_from_step,
                    "sharded": sharding.is_sharded(full.model), "local": local, "total": total},
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

    # The weights were sharded: each rank held about half of them.
    for r in ranks:
        assert r["sharded"] and r["local"] < 0.6 * r["total"]
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
