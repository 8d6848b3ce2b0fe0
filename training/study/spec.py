"""A study's spec (StudySpec: everything that decides its numbers, saved in study.json) and its error."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

STUDY_FORMAT = 1
EVAL_SETS = ("heldout_all", "heldout_kept")


class StudyError(ValueError):
    """The study cannot be run as asked (a message for the user, no traceback)."""


# ---- the spec -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StudySpec:
    """Everything that decides a study's numbers (saved in study.json)."""

    name: str = "default"
    preset_size: str = "tiny"
    stages: tuple[str, ...] = ("image", "video")
    overrides: tuple[str, ...] = ()  # trainer --set items; STAGE.key=value for one stage
    seeds: tuple[int, ...] = (0, 1, 2)
    holdout_fraction: float = 0.25
    holdout_sources: tuple[str, ...] = ()  # explicit held-out source ids or paths (overrides the fraction)
    split_seed: int = 0
    sample_seed: int = 0  # the uncurated arm of training seed s is drawn with (sample_seed, s)
    pretrain_compare: bool = True
    leave_one_out: tuple[str, ...] = ()  # rule columns; ("all",) = every applied rule
    sweep_column: str = ""
    sweep_percentiles: tuple[float, ...] = ()  # fractions dropped, e.g. (0, 0.1, 0.25, 0.5)
    sweep_side: str = "auto"  # drop_bottom, drop_top, or auto (from the rule's direction)
    sweep_metric: str = "heldout_all"  # the eval set that picks the sweep's best setting
    eval_windows: int = 4
    eval_sigmas: int = 8
    eval_seed: int = 1234
    eval_max_clips: int = 512  # per eval set; more are subsampled by a seeded hash of the clip id
    # The corpus: at most about this many clips, whole sources drawn by a hash of their id
    # (a proxy study trains small models; a 10^7-clip output is sampled, never loaded whole).
    max_clips: int = 20_000
    bootstrap: int = 2000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        from training.config import SIZES, STAGES

        if not self.name or "/" in self.name or self.name.startswith("."):
            raise StudyError(f"study name {self.name!r}: a plain folder name, please")
        if self.preset_size not in SIZES:
            raise StudyError(f"preset size {self.preset_size!r}: choose from {sorted(SIZES)}")
        if not self.stages or any(s not in STAGES for s in self.stages) or \
                list(self.stages) != [s for s in STAGES if s in self.stages]:
            raise StudyError(f"stages {self.stages}: a subsequence of {STAGES} in that order")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyError("seeds: at least one, all distinct")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise StudyError(f"holdout fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.sweep_side not in ("auto", "drop_bottom", "drop_top"):
            raise StudyError(f"sweep side must be auto, drop_bottom or drop_top, got {self.sweep_side!r}")
        if any(not 0.0 <= q < 1.0 for q in self.sweep_percentiles):
            raise StudyError(f"sweep percentiles are fractions dropped in [0, 1), got {self.sweep_percentiles}")
        if bool(self.sweep_column) != bool(self.sweep_percentiles):
            raise StudyError("a sweep needs both a column and percentiles")
        if self.sweep_metric not in EVAL_SETS:
            raise StudyError(f"sweep metric must be one of {EVAL_SETS}")
        if self.eval_windows < 1 or self.eval_sigmas < 1 or self.bootstrap < 100:
            raise StudyError("eval windows and sigmas must be >= 1, bootstrap draws >= 100")
        if self.max_clips < 1:
            raise StudyError(f"max clips must be >= 1, got {self.max_clips}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudySpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
