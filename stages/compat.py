"""Make ``import torchvision`` work on a CPU-only torch with a CUDA build of torchvision.

torchvision 0.28.0 on PyPI is a CUDA build. With the CPU torch this project pins, its
compiled extension (``torchvision/_C.so``) cannot load, and ``import torchvision`` (and so
``import open_clip`` / ``import easyocr``) dies with "operator torchvision::nms does not
exist", because ``torchvision/_meta_registrations.py`` registers fake kernels for the
``nms``/``qnms`` operators that the extension would have defined.

``install()`` checks whether the extension loads; only when it does not, it defines the
two operators in the ``torchvision`` namespace with a pure-torch implementation, so the
import succeeds and ``torch.ops.torchvision.nms`` computes real non-maximum suppression.
It must run before torchvision is imported. ``install_import_hook()`` (called by
``stages/__init__.py``) arranges that at no cost: a meta-path finder runs ``install()``
the first time anything imports torchvision, so processes that never touch torch do not
pay for importing it. Every Ray worker of a run does the same
first (stages/worker.py, Ray's ``worker_process_setup_hook``).
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import logging
import os

log = logging.getLogger(__name__)

_installed = False
_library = None  # keeps the torch.library.Library alive: dropping it unregisters the ops


def nms_reference(boxes, scores, iou_threshold: float):
    """Greedy non-maximum suppression, boxes (N, 4) as x1, y1, x2, y2.

    Returns the indices of the kept boxes sorted by decreasing score, as torchvision does.
    """
    import torch

    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    keep = []
    for idx in order.tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        # Intersection of the kept box with every box.
        w = (torch.minimum(x2, x2[idx]) - torch.maximum(x1, x1[idx])).clamp(min=0)
        h = (torch.minimum(y2, y2[idx]) - torch.maximum(y1, y1[idx])).clamp(min=0)
        inter = w * h
        iou = inter / (areas + areas[idx] - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _extension_loads() -> bool:
    """True when torchvision's own compiled ops load (a matching torch/torchvision pair)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision installed: nothing to fix
    folder = list(spec.submodule_search_locations)[0]
    candidates = glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError, ImportError) as exc:
        log.debug("torchvision extension does not load (%s); using pure-torch nms", exc)
        return False
    return True


def _ops_defined() -> bool:
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup raises when undefined
    except (AttributeError, RuntimeError):
        return False
    return True


def install() -> bool:
    """Define torchvision::nms/qnms when torchvision's extension cannot provide them.

    Idempotent and cheap after the first call. Returns True when the fallback was installed.
    Safe to call when torch is not installed (it then does nothing).
    """
    global _installed, _library
    if _installed:
        return _library is not None
    _installed = True
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    if _ops_defined() or _extension_loads():
        return False
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

    def _nms(dets, scores, iou_threshold):
        return nms_reference(dets, scores, iou_threshold)

    def _qnms(dets, scores, iou_threshold):
        return nms_reference(dets.dequantize(), scores.dequantize(), iou_threshold)

    lib.impl("nms", _nms, "CompositeExplicitAutograd")
    lib.impl("qnms", _qnms, "CompositeExplicitAutograd")
    _library = lib
    log.debug("installed pure-torch torchvision::nms fallback")
    return True


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs install() just before the first import of torchvision, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            import sys

            if self in sys.meta_path:
                sys.meta_path.remove(self)
            install()
        return None  # let the regular finders import the module


def install_import_hook() -> None:
    import sys

    if "torchvision" in sys.modules:
        return  # too late to help, and torchvision imported fine (or failed) on its own
    if not any(isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())
