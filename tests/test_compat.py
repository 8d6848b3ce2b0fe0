"""The torchvision compatibility hook, in this process and in Ray workers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stages.compat import nms_reference


def brute_force_nms(boxes, scores, iou_threshold):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for j in keep:
            ax1, ay1, ax2, ay2 = boxes[i]
            bx1, by1, bx2, by2 = boxes[j]
            iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
            ih = max(0.0, min(ay2, by2) - max(ay1, by1))
            inter = iw * ih
            union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
            if inter / union > iou_threshold:
                ok = False
        if ok:
            keep.append(i)
    return keep


def test_nms_reference_matches_brute_force():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=gen) * 50
    wh = torch.rand(60, 2, generator=gen) * 20 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(60, generator=gen)
    for thr in (0.1, 0.3, 0.7):
        got = nms_reference(boxes, scores, thr).tolist()
        assert got == brute_force_nms(boxes.tolist(), scores.tolist(), thr)


def test_torchvision_imports_in_a_fresh_process():
    code = ("import curation, torchvision, open_clip, easyocr, torch\n"
            "b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30.]])\n"
            "print(torch.ops.torchvision.nms(b, torch.tensor([.9, .8, .7]), 0.5).tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[0, 2]"


def test_torchvision_imports_in_ray_workers(ray_tmp):
    import ray

    from curation.pipeline import init_ray

    init_ray(None, num_cpus=1, object_store_mb=80, temp_dir=ray_tmp)
    try:
        @ray.remote
        def in_worker():
            import torch
            import torchvision  # noqa: F401 - the import itself is the test

            b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11.]])
            return torch.ops.torchvision.nms(b, torch.tensor([.9, .8]), 0.5).tolist()

        assert ray.get(in_worker.remote(), timeout=240) == [0]
    finally:
        ray.shutdown()
