"""Pipeline stages. STAGES is the one table from pipeline.yaml stage names to classes."""

from stages.filter import FilterStage
from stages.motion import MotionStage
from stages.split import SplitStage

STAGES = {
    "split": SplitStage,
    "motion": MotionStage,
    "filter": FilterStage,
}
