"""Does curation help? Proxy-model studies on one curated output (`curate ablate`).

The Stable Video Diffusion paper's data claim (Fig. 4) is that a curated set beats an
uncurated set of the same size, and its way of choosing thresholds (App. E) is to train small
proxy models on subsets filtered at different thresholds and compare them. This package does
both on top of the trainer (training/loop.py), from one finished curation output OUT_DIR:

Data (`load_corpus`): the clip rows of scores/ (at most about `max_clips`: whole sources drawn
by a hash of their id when the output has more), their payload from clips/
(run.store_all_clips), and whether each video decodes (decoded here, in full). Only decodable
clips take part.

Split (`split_sources`): held-out *sources* (not clips: the clips of one source share shots,
looks and motion, so a clip split would leak), drawn by a seeded hash of the source id,
stratified so that both sources with kept clips and sources without lose the same share.
No arm trains on a held-out source.

Arms (`plan_arms`), all built from the training sources' decodable clips:
- curated: the clips the output keeps (scores/keep);
- uncurated: a random sample of all decodable clips with the same number of clips and the same
  total frames as curated (within 0.5%), drawn again for every seed (`matched_sample`);
- leave-one-out (optional): the clips kept by the rules with one rule left out;
- sweep (optional): the clips kept with one rule set to several percentiles (App. E);
  (both re-evaluate the rules of run.json on the stored scores, as `curate refilter` does; a
  clip rejected for a reason that is no rule's, a near-duplicate say, stays out of every arm
  but uncurated);
- curated, no image pretraining: the curated clips, the video stage from a fresh network
  instead of from the image stage (SVD Fig. 3a).
Each arm's clips are written as shard files in the trainer's schema under
OUT_DIR/study/<name>/data/, and each (arm, seed) trains the same stage plan (default image
then video, the tiny preset) with the same fixed seed. Arms whose clips equal another arm's
for every seed (and whose stage plan is the same) are not trained twice: they take its numbers.

Evaluation (`evaluate_checkpoint`): the EMA network of the last stage on held-out clips, two
sets: heldout_all (every decodable clip of the held-out sources) and heldout_kept (those the
run's rules keep). Each clip gives `eval_windows` samples (frame windows drawn by a generator
seeded by (eval seed, clip id, window), exactly as the trainer builds samples), and each sample
is noised at a fixed grid of noise levels (the quantiles (k + 0.5) / K of the last stage's
log-normal training distribution, so the average approximates the expected training loss) with
noise seeded by (eval seed, clip id, window). The metric is the EDM-weighted denoising loss
averaged over the grid: deterministic, and the same noise for every arm.

Statistics (`summarize`): an arm's number is the mean over seeds of the mean over held-out
samples. Its 95% interval is a percentile bootstrap that resamples seeds and held-out units
(whole sources when the set has at least MIN_SOURCE_UNITS sources, else whole clips) together;
a difference between two arms is bootstrapped paired (the same seeds and units in each draw).
With one seed the interval covers only the choice of held-out clips, which results.json says.

Reproducibility: OUT_DIR/study/<name>/study.json records the spec, the split, every arm's clip
ids per seed, every run's resolved configs and seeds, the noise grid and library versions;
`rerun_study` trains from that file alone (clip ids, not rules), and on the same machine and
library versions gives the same numbers bit for bit (CPU; GPU kernels are not bit-stable).
Runs resume: a run whose eval.json matches its task is not trained again.

Runners: "local" trains the runs one after another in this process; "ray" runs every
(arm, seed) as a Ray task (one CPU each by default), on an embedded cluster or a cluster's
address; the run folders must then be on storage every node sees (a shared OUT_DIR).

The package, a module per part (each imports only those above it):
spec.py     StudySpec (everything that decides the numbers), StudyError, STUDY_FORMAT, EVAL_SETS
split.py    split_sources: held-out sources by a seeded hash, stratified
corpus.py   Corpus and load_corpus: the output's clip rows, which decode, the run's rules
rules.py    rules -> keep: effective_steps, keep_under, without_rule, with_percentile (sweeps)
arms.py     Arm, plan_arms, matched_sample (the uncurated arm), mark_duplicates
files.py    write_clip_files: an arm's or eval set's clips as shard files
runs.py     stage_configs, sigma_grid, run_task / run_tasks (local or Ray), evaluate_checkpoint
stats.py    summarize: means, bootstrap intervals, paired differences; comparisons_of
plan.py     prepare_study: the record (study.json); materialize: its data files and tasks
results.py  analyze (results.json), format_results, write_back (the sweep's best as the rule)
command.py  run_study, rerun_study and `curate ablate` (ablate_command)
report.py   write_page: the study's page (tables and plots)
"""

from __future__ import annotations

from stages.rules import is_percentile
from training.study.arms import FRAME_TOLERANCE, Arm, mark_duplicates, matched_sample, plan_arms
from training.study.command import ablate_command, rerun_study, run_study
from training.study.corpus import Corpus, load_corpus
from training.study.files import PAYLOAD_COLUMNS, write_clip_files
from training.study.plan import materialize, prepare_study, study_dir
from training.study.results import analyze, format_results, write_back
from training.study.rules import (effective_steps, keep_under, other_rejections, rule_step, ruled_columns, sweep_side,
                                  with_percentile, without_rule)
from training.study.runs import evaluate_checkpoint, run_task, run_tasks, sigma_grid, stage_configs, task_hash
from training.study.spec import EVAL_SETS, STUDY_FORMAT, StudyError, StudySpec
from training.study.split import split_sources
from training.study.stats import MIN_SOURCE_UNITS, comparisons_of, summarize

__all__ = ["ablate_command", "StudySpec", "StudyError", "Corpus", "Arm", "load_corpus", "split_sources", "plan_arms",
           "matched_sample", "prepare_study", "run_study", "rerun_study", "run_tasks", "run_task",
           "evaluate_checkpoint", "summarize", "analyze", "write_back", "format_results", "sigma_grid",
           "keep_under", "effective_steps", "write_clip_files", "is_percentile",
           # also used by the tests and the bench
           "STUDY_FORMAT", "MIN_SOURCE_UNITS", "FRAME_TOLERANCE", "EVAL_SETS", "PAYLOAD_COLUMNS",
           "mark_duplicates", "materialize", "study_dir", "other_rejections", "rule_step", "ruled_columns",
           "sweep_side", "with_percentile", "without_rule", "task_hash", "stage_configs", "comparisons_of"]
