"""split: one decode pass per source -> single-shot clips with their encoded video and frames.

For each source row (source_path, source_id, unit_id) this stage opens the file with PyAV,
decodes it once, runs PySceneDetect detectors on small copies of the frames, and cuts the
stream into clips. In the same pass it produces, per clip:
  video          H.264 mp4 bytes at `short_side_px` (aspect kept), at the source frame rate
  keyframes      JPEG bytes of the first, middle and last frame
  sample_frames  JPEG frames sampled at `sample_fps` (2 fps), read by the motion stage
  temporal_signature  8x8 grey thumbnails at 4 per second (stages/signature.py), for dedup
and the identity columns of curation/schema.py. Every source ends as at least one row: a
source that cannot be opened or decoded becomes one row with `split_error` set and
`source_status` "unreadable"; one that decodes but has no shot of at least `min_duration_s`
becomes one "no_clips" row saying so (e.g. "no shot of at least 2.0 s (longest 1.4 s)"); one
that breaks part-way keeps the clips finished before the break and adds a "decode_error" row.

Memory is bounded regardless of video length: only the last `lag_s` seconds of small frames
are held (the detectors' decision latency; longer when `max_dissolve_s` needs it: about
1.5 times it, 3 s at the default 2 s), and `max_fade_s` (plus 3 frames) at each end of
the clip being built (where a fade may be trimmed), clips are encoded as frames arrive, and a
scene longer than `max_duration_s` is cut into chunks.

Frame accuracy: detectors report a cut at the first frame of the new shot. Frames are
assigned to a clip only once they are `lag_s` behind the decoder, so every cut a detector
reports (ContentDetector at once, AdaptiveDetector `window_width` frames late, the fade
detector at the end of a fade) is known before the frames around it are assigned.
Cuts that two detectors place within `merge_cuts_within_frames` of each other are one cut
(CutMerger), so the cascade makes no one-frame fragments.
The middle keyframe is the sample frame nearest the middle of the clip (at most
1/(2*sample_fps) s away), which keeps the pass single and the memory bounded.

Fades (fades.py): a fade through black or white is the picture scaled smoothly towards
black (white) and back: monotone levels over at least 4 frames, no step between two frames
over 40% of the ramp, its contrast following its level (frame-to-frame correlation does not
survive fast pans; a scaled picture's contrast-to-level ratio does). A fade gets one cut.
Content and adaptive cut where the picture gets dark, the fade detector in the middle of the
black, the dissolve detector sometimes in a ramp: the cuts of any detectors inside one fade
are joined (_Segmenter._join_fade_cuts, CutMerger.join_fade) into one in the middle of the
frames under half their shot's steady level; at the hard cut when a hard cut leads into or
out of the black; none when the fade starts or ends the source. A clip never starts or ends
inside a fade: its whole ramp (up to `max_fade_s`, 1 s) and black (white) frames are
trimmed, up to the first frame within 5% of the shot's steady level, whatever the curve;
frames darker than `trim_dark_below` (12, the fade detector's threshold) are trimmed at a
clip's ends in any case. A shot dark throughout is kept whole, and a change of light that is
not a fade (a light switched on: one big step; a flash: 1-3 frames) is kept. Trimmed frames
are counted in `dark_frames_trimmed`. bench/cut_bench.py (cascade): fades 16 of 16 at +-1
frame, precision 1.00 (0.57 before: 10 second cuts), clips starting or ending darker than 32:
0 of 53 (28 before); hard cuts and dissolves unchanged. `max_fade_s: 0` restores the old
behaviour (dark frames only, the detectors' cuts as they are).

Dissolves (dissolves.py): a cross-fade's span, the frames in which both shots weigh at least
5% (the share fades are trimmed to), is measured at every cut (of any detector) and at the
candidates of split's own search for dissolves too long for the dissolve detector's 12-frame
windows (LongDissolves), and cut out of both clips: the clip before ends at the span's first
frame, the clip after starts past its last, and the dissolve has one cut, in the span's
middle (_Segmenter._join_dissolve_cuts). Each clip counts the frames it lost in
`dissolve_frames_trimmed`. A frame's weight is its position on the line between a frame of
each shot just outside the span, corrected for the shots' own motion; what is not a blend of
two pictures (a hard cut, a fade, a change of light or exposure, a pan, a zoom) has no span
and keeps its cut as it is. A dissolve longer than `max_dissolve_s` (2 s) keeps the one cut
its detector gave it. `max_dissolve_s: 0` restores the old behaviour. bench/cut_bench.py
(cascade, 32 dissolves of 6-48 frames, linear and eased): spans cut out at +-1 frame 28 of 32
with precision 1.00 (none before), clip edges holding a blend 5 (61 before), dissolve cuts
at +-1 29 of 32 with precision 0.91 (26, 0.76); hard cuts and fades unchanged. The 4 missed
are dissolves into or out of a frame-high object crossing fast, which is not a steady blend.

Timing follows the frames' timestamps, so variable-frame-rate sources keep theirs:
`start_s` is the first frame's time, `duration_s` the time to the frame after the clip's
last one, motion samples are taken every 1/sample_fps seconds (not every n frames), and
the clip is encoded with its frames' own times. `fps` is the source's average rate.
A stream whose timestamps jump back (a splice) is cut there.

The package: stage.py drives the rest, listed in the order a frame meets them.
  stage.py    SplitStage (its options, one source to its rows) and no_clip_row
  settings.py SplitSettings: the options the modules below read, handed down by the stage
              (nothing below it imports stage.py)
  decode.py   probe(), the source's frame rate, _DecodeAhead (decoding and scaling in a thread)
  scale.py    output_size(), SourceColour and FrameScaler (source frames to the clip size, BGR
              and yuv420p, read in the source's own colour)
  segment.py  _Segmenter: one source's frames through the detectors, cuts applied, frames
              assigned to clips `lag_s` behind the decoder
  cuts.py     the detector cascade (make_detector, spec_at_rate), CutMerger,
              share_content_scores and the flash filter's constants
  fades.py    what a fade is: measure() (a frame's level and contrast), ramp(), edge_fade()
              (the fade frames at a clip's end) and fade_at() (the fade a cut falls in)
  dissolves.py  what a dissolve is: dissolve_at() (the span a cut falls in, measured on
              thumbnails) and LongDissolves (candidate cuts in long ones)
  clip.py     _ClipBuilder: one clip's frames held, trimmed, encoded, sampled
  encode.py   the x264 options, _BackgroundEncoder (H.264 on its own thread), encode_jpeg
This module re-exports the public names; to monkeypatch one, patch it in the module that
uses it (e.g. stages.split.segment.make_detector), not here.
"""

from stages.split.cuts import (
    DEFAULT_CASCADE,
    FLASH_MATCH_SHARE,
    FLASH_MAX_FRAMES,
    FLASH_MAX_MATCH,
    FLASH_MIN_JUMP,
    REFERENCE_FPS,
    CutMerger,
    frame_distance,
    make_detector,
    share_content_scores,
    spec_at_rate,
)
from stages.split.decode import probe, source_frame_rate
from stages.split.encode import CLIP_TIME_BASE, DEFAULT_X264_PARAMS, check_encoder, encode_jpeg, encoder_options
from stages.split.scale import HD_MIN_HEIGHT, FrameScaler, SourceColour, even, output_size
from stages.split.settings import SplitSettings
from stages.split.stage import DetectorName, SplitStage, no_clip_row

__all__ = [
    "CLIP_TIME_BASE", "DEFAULT_CASCADE", "DEFAULT_X264_PARAMS", "FLASH_MATCH_SHARE", "FLASH_MAX_FRAMES",
    "FLASH_MAX_MATCH", "FLASH_MIN_JUMP", "HD_MIN_HEIGHT", "REFERENCE_FPS", "CutMerger", "DetectorName",
    "FrameScaler", "SourceColour", "SplitSettings", "SplitStage", "check_encoder", "encode_jpeg", "encoder_options", "even",
    "frame_distance", "make_detector", "no_clip_row", "output_size", "probe", "share_content_scores",
    "source_frame_rate", "spec_at_rate",
]
