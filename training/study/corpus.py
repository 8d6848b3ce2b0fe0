"""The study's corpus: the clip rows of one finished output, which decode, and the run's rules."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from curation import schema
from curation.writer import OutputStore
from stages.rules import Rules, filter_steps, float_values
from training.study.spec import StudyError
from training.study.split import _rank

log = logging.getLogger(__name__)


# ---- the corpus -------------------------------------------------------------------------

@dataclass
class Corpus:
    """The clip rows of a finished output, with decodability and the run's rules."""

    out_dir: str
    clips: pa.Table  # scores rows with a frame range, in scores order
    decodable: np.ndarray  # bool per row
    decode_errors: dict[str, str]  # clip_id -> why it is left out
    steps: list[tuple[str, Rules]]  # the applied filter rules, pipeline order
    resolved: dict[str, dict[str, Any]]  # run.json's resolved_rules
    run: dict[str, Any]

    @property
    def ids(self) -> list[str]:
        return self.clips.column("clip_id").to_pylist()

    def column(self, name: str) -> np.ndarray:
        if name not in self.clips.column_names:
            return np.full(self.clips.num_rows, np.nan)
        return float_values(self.clips.column(name))

    @property
    def frames(self) -> np.ndarray:
        return (np.asarray(self.clips.column("end_frame").to_pylist(), dtype=np.int64)
                - np.asarray(self.clips.column("start_frame").to_pylist(), dtype=np.int64))

    @property
    def sources(self) -> np.ndarray:
        return np.asarray(self.clips.column("source_id").to_pylist(), dtype=object)

    @property
    def stored_keep(self) -> np.ndarray:
        return np.asarray([bool(k) for k in self.clips.column("keep").to_pylist()])


def load_corpus(out_dir: str, max_clips: int | None = None) -> Corpus:
    """The clips of a finished output (all of them, or with `max_clips` a sample of whole
    sources of about that many clips, drawn by a hash of the source id: the same sample every
    time), streamed from scores/, each video decoded from clips/ once to know it decodes;
    and the rules from run.json."""
    from curation import columns
    from training.data import decode_video

    store = OutputStore(out_dir)
    problem = store.not_ready_reason()
    if problem:
        raise StudyError(problem)
    run = store.read_run()
    ledger = store.ledger()
    total = int(ledger.totals().get("clips", 0))
    share = 1.0 if not max_clips or total <= max_clips else max_clips / total
    parts = []
    for table in columns.scan(ledger.files("scores")):
        table = schema.conform(table, schema.SCORES_SCHEMA).filter(pa.array(columns.is_clip(table)))
        if share < 1.0:
            table = table.filter(_sampled(table.column("source_id"), share))
        if table.num_rows:
            parts.append(table)
    if not parts:
        raise StudyError(f"{out_dir} has no clips")
    clips = pa.concat_tables(parts)
    if share < 1.0:
        log.info("study corpus: %d of the output's %d clips (whole sources, a %.3g share)", clips.num_rows,
                 total, share)
    clip_files = [p for p in ledger.files("clips") if p.exists()]
    if not clip_files:
        raise StudyError(f"{out_dir} has no clips/ files: the study needs every clip's video, kept or not "
                         "(run.store_all_clips: true, the default); rerun `curate run` with it")
    index = {cid: i for i, cid in enumerate(clips.column("clip_id").to_pylist())}
    wanted = clips.column("clip_id").combine_chunks()
    decodable = np.zeros(clips.num_rows, dtype=bool)
    errors: dict[str, str] = {}
    for part in columns.scan(clip_files, ["clip_id", "video"]):
        if share < 1.0:
            part = part.filter(pa.compute.is_in(part.column("clip_id"), value_set=wanted))
        for cid, video in zip(part.column("clip_id").to_pylist(), part.column("video").to_pylist()):
            if cid not in index:
                continue
            if video is None:
                errors[cid] = "no video stored"
                continue
            try:
                decode_video(video)
                decodable[index[cid]] = True
            except Exception as exc:  # noqa: BLE001  (any decoder failure leaves the clip out)
                errors[cid] = f"{type(exc).__name__}: {exc}"
    for cid, i in index.items():
        if not decodable[i] and cid not in errors:
            errors[cid] = "no payload in clips/"
    return Corpus(str(out_dir), clips, decodable, errors, filter_steps(run.get("config") or {}),
                  run.get("resolved_rules") or {}, run)


def _sampled(source_ids: pa.ChunkedArray, share: float) -> pa.Array:
    """Rows whose source is in the sample: a hash of the source id below `share`."""
    encoded = source_ids.combine_chunks().dictionary_encode()
    inside = np.array([int(_rank(0, sid)[:13], 16) < share * 16**13 for sid in encoded.dictionary.to_pylist()],
                      dtype=bool)
    return pa.array(inside[encoded.indices.to_numpy(zero_copy_only=False)]) if len(inside) else \
        pa.array(np.zeros(len(source_ids), bool))

