"""Near-duplicate removal over a whole run: candidates by vector, duplicates by their time course.

Re-uploads are everywhere in web video: the same footage re-encoded, resized, cropped a little
or started a second later, and the very same file posted again and again. A re-upload is the
same footage over the same time, not the same scene: two 10 s chunks of one static camera share
their layout and colours, but not the people walking through. So this package decides in two
steps, across every committed unit, and keeps one clip of each group;
`curation.finalize.apply_rules` applies the decisions with the filter rules (at the end of
`curate run`, in `curate refilter` and in `curate dedup`), so they are written to scores/ and
shards/ by the same crash-safe pass.

1. Candidates (one unit vector per clip; pairs at cosine >= 1 - eps):
- `image_embedding`: the aesthetics stage's CLIP vector (mean over the keyframes), read from
  clips/ (or the shards when clips/ is not stored);
- `perceptual` (no weights): per keyframe, the 8x8 lowest 2-D DCT coefficients of a 32x32 grey
  thumbnail (DC left out; layout, robust to re-encoding and resizing), the Cr/Cb planes at 4x4
  (where the colours are) and a 12 hue x 4 saturation histogram (colour content, blind to
  crops and motion), each part normalised; the clip's vector is the normalised mean over its
  first/middle/last keyframes. Computed once per data file and cached in
  dedup/perceptual/<data file>.parquet (float16; a data file's name is never reused).
- `auto`: image_embedding when the run has any, else perceptual. Clips without a vector (a
  failed aesthetics stage, no keyframes) are never grouped.
eps is loose (0.3 perceptual, 0.1 CLIP): it only has to let every copy through.

2. Duplicates: a candidate pair is a duplicate pair when the clips' temporal signatures (4 grey
8x8 thumbnails a second, the split stage's `temporal_signature` column; stages/signature.py)
match at >= min_match (0.85) at some time shift of at most max_shift_s (2 s): the same picture
and the same changes at the same times. Chunks of one static camera do not match (other
passers-by), a copy of chunk k matches chunk k, and two clips of one source match only when the
footage repeats (a loop, a replay). Outputs written before the column existed get signatures
decoded from the clips' video, cached in dedup/temporal/<data file>.parquet.

How, at 10^7 clips and in memory bounded by `memory_mb` (groups.py and the steps it runs): the
vectors, clip ids and signatures go to files in a temporary folder, read a block or a set of rows
at a time; exact copies (the same float16 vector and the same signature: one file posted again) are
one class, of which one clip is searched and verified, so a corpus of a hundred copies of every
clip costs what its distinct clips cost; the candidates come from the leaves of a tree of
k-means buckets (spherical k-means fitted on a sample; a clip also joins its second-nearest
bucket when that centroid is within `margin` of its nearest; a bucket over 4 x bucket_size is
split again; two trees from other seeds are unioned), each clip taking its CANDIDATES_PER_CLIP
most similar partners of a bucket; pairs are verified in blocks over a process per CPU; groups
are the connected components of the matching pairs. bench/dedup_bench.py measures recall,
time and memory.

Decisions (`choose`): within a group, clips are taken in priority order (passing the other
rules first, then `keep_by` columns, highest first, missing last, then clip_id); a clip that
matches a clip already kept is a duplicate of the best-matching one, else it is kept. So every
duplicate matches the clip it names (chains A~B~C do not reject C when C does not itself match
A), a clip that failed other rules is never kept over a duplicate that passed, and decisions
change with the rules without recomputing the groups. A duplicate gets the reject reason
"duplicate_of:<clip_id>" (after its rules' reasons); its match score, shift and group go to
dedup/duplicates.parquet (in the order of scores/), counts and settings to dedup/dedup.json.
The groups cache (dedup/groups.parquet: every grouped clip, its group and its class of copies;
pairs.parquet: the matching pairs of distinct clips; classes.parquet: each grouped class's
self-match and signature; groups.json, written last: the key) is keyed by the embedding, the
settings and the committed units (not the files that hold them: a compaction keeps them), so a
refilter with new rules reuses it.

The modules, the pass first:
- decisions.py: `decide` (the pass finalize runs), the priorities under the rules, the
  duplicates file (`Decisions`) and dedup.json (`record`); REASON_PREFIX;
- cache.py: the run's groups, cached in dedup/ (`run_groups`, `GroupsCache`);
- corpus.py: the run's clips as rows of the search: vectors and signatures read from the
  output's files, and their per-file caches; perceptual.py: the perceptual embedding;
- the out-of-core search: groups.py (`find_groups`: steps 1-4, the components), copies.py
  (exact copies), candidates.py (the k-means tree), matching.py (temporal verification) and
  choosing.py (the kept clip of each group, `choose_duplicates`); their files: spill.py,
  budget.py (memory_mb, progress), arrow_bytes.py (Arrow buffers as numpy bytes);
- in_memory.py: the same in memory (`choose`, `Groups`, `UnionFind`, `candidate_pairs`): the rule,
  small inputs, tests and benches; defaults.py: the section's defaults (`settings`).
"""

from __future__ import annotations

# The names other code, the tests and the benches use as curation.dedup.NAME.
from curation.dedup.cache import GroupsCache, run_groups
from curation.dedup.corpus import (
    Batch,
    Collected,
    clip_ids,
    collect,
    file_batches,
    has_image_embeddings,
    payload_files,
    remove_stale_caches,
    resolve_embedding,
    signature_fetch,
)
from curation.dedup.decisions import REASON_PREFIX, Decisions, decide, prioritised, record
from curation.dedup.defaults import (
    CANDIDATES_PER_CLIP,
    DEFAULT_EPS,
    DEFAULT_MAX_SHIFT_S,
    DEFAULT_MEMORY_MB,
    DEFAULT_MIN_MATCH,
    settings,
)
from curation.dedup.in_memory import Groups, UnionFind, candidate_pairs, choose, near_duplicate_components, priority_of
from curation.dedup.perceptual import PERCEPTUAL_VERSION, keyframe_features, perceptual_embedding
from curation.writer import OutputError

__all__ = [
    "Batch", "CANDIDATES_PER_CLIP", "Collected", "DEFAULT_EPS", "DEFAULT_MAX_SHIFT_S", "DEFAULT_MEMORY_MB",
    "DEFAULT_MIN_MATCH", "Decisions", "Groups", "GroupsCache", "OutputError", "PERCEPTUAL_VERSION", "REASON_PREFIX",
    "UnionFind", "candidate_pairs", "choose", "clip_ids", "collect", "decide", "file_batches",
    "has_image_embeddings", "keyframe_features", "near_duplicate_components", "payload_files",
    "perceptual_embedding", "prioritised", "priority_of", "record", "remove_stale_caches", "resolve_embedding",
    "run_groups", "settings", "signature_fetch",
]
