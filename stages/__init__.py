"""Pipeline stages. STAGES is the one table from pipeline.yaml stage names to classes."""

from stages.aesthetics import AestheticsStage
from stages.caption import CaptionStage
from stages.clip_similarity import ClipSimilarityStage
from stages.fault import FaultStage
from stages.filter import FilterStage
from stages.motion import MotionStage
from stages.ocr import OcrStage
from stages.split import SplitStage

STAGES = {
    "split": SplitStage,
    "motion": MotionStage,
    "ocr": OcrStage,
    "aesthetics": AestheticsStage,
    "caption": CaptionStage,
    "clip_similarity": ClipSimilarityStage,
    "filter": FilterStage,
    "fault": FaultStage,  # deliberate failures, for containment tests and the soak benchmark
}
