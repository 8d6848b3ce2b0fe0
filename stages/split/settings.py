"""SplitSettings: what the segmenter and the clip builder read of the split stage's options
(SplitStage checks them when it is built and hands this value down), so that nothing in
split/ below the stage needs the stage itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any


@dataclass(frozen=True)
class SplitSettings:
    detector_specs: tuple[dict[str, Any], ...]
    min_duration_s: float
    max_duration_s: float
    trim_frames: int
    short_side_px: int
    detect_width_px: int
    sample_fps: float
    jpeg_quality: int
    crf: int
    preset: str
    x264_params: str
    lag_s: float
    merge_cuts_within_frames: int
    trim_dark_below: float
    max_fade_s: float
    max_dissolve_s: float

    def fade_frames(self, rate: Fraction) -> int:
        """The longest fade ramp, in frames, trimmed from a clip's ends and whose cuts are
        made one (stages/split/fades.py); 0: neither, only the dark frames are trimmed."""
        return max(0, math.ceil(self.max_fade_s * float(rate) - 1e-6))

    def dissolve_frames(self, rate: Fraction) -> int:
        """The longest dissolve, in frames, whose span is trimmed from the clips on both
        sides (stages/split/dissolves.py); a longer one keeps its one cut. 0: none is."""
        return max(0, math.ceil(self.max_dissolve_s * float(rate) - 1e-6))

    def min_frames(self, rate: Fraction) -> int:
        return max(1, math.ceil(self.min_duration_s * float(rate) - 1e-6))
