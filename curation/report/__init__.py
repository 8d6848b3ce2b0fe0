"""`curate report OUT`: filter statistics of a run, computed from the written tables only.

`funnel(out_dir)` / `format_funnel(f)`: the short funnel (sources, clips, kept, rejections per
reason) as a dict and as text.

`write_report(out_dir, to=None)` writes OUT/report/ (or the folder `to`; either may be an
object-store URI, curation/outdir.py):
    index.html    one self-contained page (images, plots and videos inline as data: URLs;
                  opens from disk with no server and no network)
    summary.json  every number on the page (returned as a dict too)
    sources.csv   the per-source table in full (the page shows the largest sources)
    plots/*.png   funnel, one histogram per score (kept/rejected, thresholds drawn), overlaps
`format_summary(summary)` is the headline table for the terminal.
With a dedup section in the run's config, the page also has a near-duplicates section
(dedup.py, html.py) and the reasons "duplicate_of:<clip_id>" count as one rule.

Where the numbers come from:
- rules: run.json's config (every filter step's args.rules, pipeline order) plus
  run.json's resolved_rules (thresholds of percentile rules, curation/finalize.py);
  run.json's skipped_steps / rules_not_applied mark rules that were not applied;
- which rule rejected a clip: the stored reject_reasons, each reason attributed to the rule on
  its column ("motion_score<1" -> the motion_score rule; when two steps rule the same column
  the threshold in the reason picks the step, and ":missing" counts for each of them);
- cascade: rules in pipeline order, each removing the clips no earlier rule removed, so the
  last line equals the kept clips; "only this rule": clips whose every reason is that rule's;
  overlaps: clips rejected by both of two rules, and the most frequent exact combinations.
Source-error rows ("split_error") are not clips: they are counted per stage under errors, and
per source by their source_status (unreadable, decode_error, no_clips, worker_died,
timed_out; curation/schema.py) in totals.source_outcomes, so sources that decoded but had no
shot long enough are told apart from unreadable ones.

Size at scale: plots are drawn from histogram counts; galleries show at most
`max_gallery` rejected clips per rule (the most borderline ones, then a spread of the rest)
and `max_strip` kept clips just inside the threshold; at most `max_videos` kept clips are
embedded as playable H.264 (and at most `max_video_bytes` in all). Keyframes and videos are
read only for those clips, one parquet row group at a time.

The modules: write.py writes the report (`write_report`: the summary computed once, then
handed to every output); the numbers, no HTML (also for other pages of the same data):
summary.py (`summarize`, `funnel`), aggregates.py (its streamed pass 1), rules.py (the rules of a
run), dedup.py (the near-duplicate section); the outputs: media.py (plots, thumbnails, videos),
plots.py (matplotlib), html.py (the page); text.py: the terminal tables.
"""

from __future__ import annotations

# Imported from here by the CLI, the tests and the benches.
from curation.report.summary import format_outcomes, funnel, summarize
from curation.report.text import format_funnel, format_summary
from curation.report.write import write_report

__all__ = ["format_funnel", "format_outcomes", "format_summary", "funnel", "summarize", "write_report"]
