"""What every pipeline stage is: a plain class with a declared set of output columns.

A stage has a cheap, validating constructor (a bad argument is a ValueError naming it),
setup() that loads heavy state once per worker, and __call__(batch) -> batch, where a batch
is a dict of equal-length lists (column name -> values). A stage only adds the columns it
declares in `outputs` (and may overwrite them); the runners check this after every call.
A "fan-out" stage (split) turns each input row into zero or more new rows instead.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

Batch = dict[str, list]


# ---- identity (re-exported by curation/schema.py, the data contract) ----------------------

def source_id_for(path: str) -> str:
    """Deterministic id of a source: a hash of its absolute path."""
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]


def clip_id_for(source_id: str, start_frame: int | None, end_frame: int | None) -> str:
    """Deterministic id of a clip: source and frame range [start_frame, end_frame).

    A source that could not be split gets one error row with start/end None.
    """
    key = f"{source_id}:{start_frame}:{end_frame}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]



class Stage:
    name: ClassVar[str] = ""
    outputs: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()  # columns produced by other steps it cannot do without
    fan_out: ClassVar[bool] = False

    def setup(self) -> None:
        """Load models or other heavy state; called once per worker before the first batch."""

    def __call__(self, batch: Batch) -> Batch:  # pragma: no cover - interface
        raise NotImplementedError


def produced_columns() -> set[str]:
    """Every column some stage class declares in `outputs` (each defined stage, so every
    stage of the STAGES table once `stages` is imported)."""
    columns, todo = set(), list(Stage.__subclasses__())
    while todo:
        cls = todo.pop()
        columns.update(cls.outputs)
        todo.extend(cls.__subclasses__())
    return columns


def batch_len(batch: Batch) -> int:
    for values in batch.values():
        return len(values)
    return 0


def check_output(stage: Stage, before: Batch, after: Batch) -> None:
    """Raise if a non-fan-out stage dropped rows, dropped columns or added undeclared ones."""
    if stage.fan_out:
        missing = [c for c in stage.outputs if c not in after]
        if missing and batch_len(after):
            raise RuntimeError(f"stage {stage.name!r} did not produce declared columns {missing}")
        return
    n = batch_len(before)
    for name, values in after.items():
        if len(values) != n:
            raise RuntimeError(f"stage {stage.name!r} returned {len(values)} values for {name!r}, expected {n}")
    added = set(after) - set(before)
    undeclared = sorted(added - set(stage.outputs))
    if undeclared:
        raise RuntimeError(f"stage {stage.name!r} added undeclared columns {undeclared}")
    dropped = sorted(set(before) - set(after))
    if dropped:
        raise RuntimeError(f"stage {stage.name!r} dropped columns {dropped}")
