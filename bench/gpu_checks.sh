#!/usr/bin/env bash
# The trainer's GPU checks of issue 24, in one run that fits a device lease (about 9 minutes on
# one H200): the base and large presets with and without torch.compile, the issue's 324M
# config at batch 32 with activation checkpointing (goal: peak <= 40 GiB), and which SDPA
# kernel the attention gets. Needs PyAV and tensorboardX wheels for Python 3.12 in .whl/
# (see the device tool's README), everything else is in a stock PyTorch GPU image.
#
#     bash bench/gpu_checks.sh 2>&1 | tee "$OUT/gpu_checks.log"
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY'
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
q = torch.randn(8, 6, 384, 64, device="cuda", dtype=torch.bfloat16)
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
    try:
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(q, q, q)
        print("sdpa", backend, "available for bf16 head_dim 64")
    except RuntimeError as exc:
        print("sdpa", backend, "not available:", str(exc).splitlines()[0])
PY
B="python3 bench/train_bench.py --device cuda --data-workers 4 --threads 4"
timeout 170 $B --preset-size base --stage video --steps 14 --skip-steps 6 --set compile=on
timeout 100 $B --preset-size base --stage video --steps 12 --skip-steps 4 --set compile=off
timeout 100 $B --preset-size base --stage image --steps 12 --skip-steps 4 --set compile=off
timeout 120 $B --preset-size large --stage video --steps 10 --skip-steps 4 --set compile=off
timeout 80 $B --preset-size small --stage video --steps 10 --skip-steps 4 --set resolution_px=64 \
    --set model_channels=192 --set channel_mult=1,2,3,4 --set num_res_blocks=2 --set attention_levels=1,2,3 \
    --set num_heads=6 --set batch_size=32 --set num_frames=8 --set activation_checkpointing=true --set compile=off
