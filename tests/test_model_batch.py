"""stages/model_batch.py: the decode -> one forward pass -> per-clip results pattern of the
model stages (ocr, aesthetics, clip_similarity)."""

from __future__ import annotations

import numpy as np

from stages.model_batch import forward_keyframes


def decode(data: bytes) -> np.ndarray:
    if data == b"bad":
        raise ValueError("not a JPEG")
    return np.full((2, 2), len(data), np.uint8)


BATCH = {"clip_id": ["a", "b", "c", "d"], "start_frame": [0, 0, None, 0],
         "keyframes": [[b"x", b"xx"], [b"bad"], None, [b"xxx"]]}


def test_one_pass_over_the_good_clips_and_each_clip_gets_its_own_images():
    errors = [None] * 4
    calls = []

    def forward(keyframes):
        calls.append(len(keyframes.images))
        return np.array([float(im[0, 0]) for im in keyframes.images])

    keyframes, result = forward_keyframes(BATCH, [0, 1, 3], decode, forward, errors, "test")
    assert calls == [3]  # one pass, over the three keyframes of the two clips that decode
    assert errors == [None, "ValueError: not a JPEG", None, None]  # the bad clip fails alone
    per_clip = {i: result[mask].tolist() for _, i, mask in keyframes.by_clip()}
    assert per_clip == {0: [1.0, 2.0], 3: [3.0]}


def test_a_failing_pass_is_every_clip_of_the_pass_s_error():
    errors = [None] * 4

    def forward(keyframes):
        raise MemoryError("out of memory")

    assert forward_keyframes(BATCH, [0, 1, 3], decode, forward, errors, "test") is None
    assert errors == ["MemoryError: out of memory", "ValueError: not a JPEG", None,
                      "MemoryError: out of memory"]


def test_no_clip_to_run_means_no_pass():
    errors = [None] * 4
    assert forward_keyframes(BATCH, [1], decode, lambda k: 1 / 0, errors, "test") is None
    assert errors[1] == "ValueError: not a JPEG"
