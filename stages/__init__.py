"""Pipeline stages. STAGES is the one table from pipeline.yaml stage names to classes."""

from stages import compat as _compat

# torchvision (pulled in by open_clip and easyocr) needs its ops defined before import on
# CPU torch; the hook does that on first import of torchvision, and costs nothing otherwise.
_compat.install_import_hook()

from stages.aesthetics import AestheticsStage  # noqa: E402  (after the hook, like every stage)
from stages.caption import CaptionStage  # noqa: E402
from stages.clip_similarity import ClipSimilarityStage  # noqa: E402
from stages.fault import FaultStage  # noqa: E402
from stages.filter import FilterStage  # noqa: E402
from stages.motion import MotionStage  # noqa: E402
from stages.ocr import OcrStage  # noqa: E402
from stages.split import SplitStage  # noqa: E402
from stages.standin import StandinSplitStage  # noqa: E402

STAGES = {
    "split": SplitStage,
    "motion": MotionStage,
    "ocr": OcrStage,
    "aesthetics": AestheticsStage,
    "caption": CaptionStage,
    "clip_similarity": ClipSimilarityStage,
    "filter": FilterStage,
    "fault": FaultStage,  # deliberate failures, for containment tests and the soak benchmark
    "split_standin": StandinSplitStage,  # rows without decoding, for bench/scale_bench.py
}
SPLITTERS = ("split", "split_standin")  # the stages a pipeline may start with
