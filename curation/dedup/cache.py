"""The run's near-duplicate groups, cached in dedup/: computed by groups.find_groups over the
clips' vectors and signatures, reused while the settings and the committed units are the same."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation import outdir
from curation.dedup.budget import Budget
from curation.dedup.candidates import Search
from curation.dedup.corpus import clip_ids, collect, payload_files, resolve_embedding, signature_fetch
from curation.dedup.defaults import CANDIDATES_PER_CLIP, settings
from curation.dedup.groups import (
    CLASSES_SCHEMA,
    ENGINE_VERSION,
    GROUPS_SCHEMA,
    PAIRS_SCHEMA,
    Corpus,
    Writers,
    find_groups,
)
from curation.dedup.matching import Matching
from curation.dedup.perceptual import PERCEPTUAL_VERSION
from curation.dedup.spill import Workdir
from curation.ledger import Ledger
from curation.writer import OutputStore, write_json
from stages import signature

log = logging.getLogger("curation.dedup")

# Temporary files per clip besides its vector: key, id, row, labels, flags (spill.py); with
# the vector, what the disk check before a pass asks for.
SPILL_BYTES_PER_CLIP = 160


def _groups_key(opts: tuple, ledger: Ledger) -> str:
    key = json.dumps([PERCEPTUAL_VERSION, signature.SIGNATURE_VERSION, ENGINE_VERSION, *opts,
                      ledger.fingerprint()], default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]



class GroupsCache:
    """dedup/groups.parquet, pairs.parquet and classes.parquet (groups.find_groups' tables)
    and groups.json, written last: their key and counts."""

    NAMES = ("groups", "pairs", "classes")

    def __init__(self, store: OutputStore):
        self.folder = store.root / "dedup"
        self.record = self.folder / "groups.json"

    def path(self, name: str) -> Any:
        return self.folder / f"{name}.parquet"

    def read(self, key: str) -> dict[str, Any] | None:
        """groups.json's content when it holds `key` and every table is there."""
        if not self.record.exists():
            return None
        meta = json.loads(self.record.read_text())
        if meta.get("key") != key or not all(self.path(n).exists() for n in self.NAMES):
            return None
        return meta

    @contextlib.contextmanager
    def writers(self) -> Iterator[Writers]:
        """Writers of the three tables (staged; each in place when the block ends without error)."""
        self.record.unlink(missing_ok=True)  # the tables change: the key goes first
        self.folder.mkdir(parents=True, exist_ok=True)
        schemas = {"groups": GROUPS_SCHEMA, "pairs": PAIRS_SCHEMA, "classes": CLASSES_SCHEMA}
        with contextlib.ExitStack() as stack:
            files = {n: pq.ParquetWriter(stack.enter_context(outdir.staged_file(self.path(n))), schemas[n],
                                         compression="zstd") for n in self.NAMES}
            try:
                yield Writers(*(files[n].write_table for n in self.NAMES))
            finally:
                for f in files.values():
                    f.close()

    def tables(self, name: str, columns_: list[str] | None = None) -> Iterator[pa.Table]:
        """A table's row groups, in order."""
        f = outdir.parquet_file(self.path(name))
        for g in range(f.num_row_groups):
            yield f.read_row_group(g, columns=columns_)


def run_groups(store: OutputStore, ledger: Ledger, opts: dict[str, Any]) -> tuple[GroupsCache, dict[str, Any]]:
    """The run's near-duplicate groups under `opts` (the config's dedup section): the groups
    cache and its record, reused when computed for the same settings and units, else computed
    by groups.find_groups over the clips' vectors and signatures."""
    files = payload_files(ledger)
    s = settings(resolve_embedding(opts.get("embedding", "auto"), files), opts)
    key = _groups_key((s["embedding"], s["eps"], s["bucket_size"], s["min_match"], s["max_shift_s"]), ledger)
    cache = GroupsCache(store)
    meta = cache.read(key)
    if meta is not None:
        log.info("dedup: groups of %s (eps %g, match %g) reused from %s", s["embedding"], s["eps"],
                 s["min_match"], cache.folder)
        return cache, meta
    budget = Budget(s["memory_mb"])
    dims = 512 if s["embedding"] == "image_embedding" else 143
    need = int(ledger.totals().get("clips", 0)) * (2 * dims + SPILL_BYTES_PER_CLIP)
    with Workdir(need_bytes=need) as work:
        collected = collect(store, files, s["embedding"], work, budget)
        corpus = Corpus(collected.vectors, collected.keys, signature_fetch(store, collected), clip_ids(collected))
        with cache.writers() as out:
            stats = find_groups(corpus, Search(s["eps"], s["bucket_size"], top_k=CANDIDATES_PER_CLIP),
                                Matching(s["min_match"], s["max_shift_s"]), work, budget, out)
    meta = {"key": key, "embedding": s["embedding"], "eps": s["eps"], "min_match": s["min_match"],
            "max_shift_s": s["max_shift_s"], "rows": stats.clips_embedded,
            **{k: getattr(stats, k) for k in ("clips_embedded", "distinct", "copy_classes", "candidate_pairs",
                                               "verified", "edges", "without_signature", "clips_in_groups",
                                               "groups", "grouped_classes", "id_bytes", "signature_bytes")},
            "seconds": {k: round(v, 3) for k, v in stats.seconds.items()}}
    write_json(cache.record, meta)
    return cache, meta
