"""The report: counts checked against counts computed here from scores/, galleries, page caps."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import Counter
from itertools import combinations
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import load_config
from curation.report import format_summary, funnel, write_report
from curation.runner import run_local, run_pipeline

REPO = Path(__file__).resolve().parents[1]
# Rules chosen so that on the fixture footage some clips fail one rule, some the other, some
# both (the static shots are also short), and the motion rule rejects on both sides.
OVERRIDES = ["split.min_duration_s=1.0", "run.sources_per_unit=2",
             "filter.rules.motion_score.min=1", "filter.rules.motion_score.max=5",
             "filter.rules.duration_s.min=2.8"]


def load_bench():
    spec = importlib.util.spec_from_file_location("report_bench", REPO / "bench" / "report_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(footage, tmp_path_factory):
    root, _ = footage
    out = tmp_path_factory.mktemp("report") / "out"
    run_pipeline(load_config(REPO / "configs" / "spine.yaml", OVERRIDES), [str(root)], out, run_local)
    return out


@pytest.fixture(scope="module")
def report(run_dir):
    return write_report(run_dir)


def scores_rows(out: Path) -> list[dict]:
    """Every row of scores/, read here without the project's readers."""
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "scores").glob("*.parquet"))]).to_pylist()


def column_of(reason: str) -> str:
    for i, ch in enumerate(reason):
        if ch in "<>:":
            return reason[:i]
    return reason


def test_counts_equal_counts_computed_from_scores(run_dir, report):
    rows = scores_rows(run_dir)
    clips = [r for r in rows if r["start_frame"] is not None]
    rules = ["duration_s", "motion_score"]  # one filter step; columns in name order
    rejected_by = [{column_of(x) for x in r["reject_reasons"]} for r in clips]
    assert any(len(s) == 2 for s in rejected_by), "the fixture must give an overlap to check"
    assert any(s == {"motion_score"} for s in rejected_by) and any(s == {"duration_s"} for s in rejected_by)

    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["totals"]["clips"] == len(clips) == report["totals"]["clips"]
    assert summary["totals"]["kept"] == sum(r["keep"] for r in clips)
    assert summary["totals"]["source_errors"] == sum(r["split_error"] is not None for r in rows)

    by_rule = {r["column"]: r for r in summary["rules"]}
    assert [r["column"] for r in summary["rules"]] == rules
    for rule in rules:
        assert by_rule[rule]["rejected"] == sum(rule in s for s in rejected_by)
        assert by_rule[rule]["only_this"] == sum(s == {rule} for s in rejected_by)

    # Cascade: each rule removes the clips no earlier rule removed; the last line is the kept.
    remaining = len(clips)
    gone: set[int] = set()
    steps = [row for row in summary["funnel"] if row["rule"]]
    for rule, row in zip(rules, steps):
        now = {i for i, s in enumerate(rejected_by) if rule in s}
        assert row["removed"] == len(now - gone)
        gone |= now
        remaining = len(clips) - len(gone)
        assert row["remaining"] == remaining
    assert summary["funnel"][-1]["remaining"] == remaining == summary["totals"]["kept"]

    ids = summary["overlaps"]["rules"]
    matrix = summary["overlaps"]["matrix"]
    for (i, a), (j, b) in combinations(enumerate(ids), 2):
        both = sum(a.split(".")[-1] in s and b.split(".")[-1] in s for s in rejected_by)
        assert matrix[i][j] == matrix[j][i] == both
    combos = Counter(tuple(sorted(s)) for s in rejected_by if s)
    assert {tuple(sorted(i.split(".")[-1] for i in c["rules"])): c["clips"]
            for c in summary["overlaps"]["combinations"]} == dict(combos)

    # Per source and errors.
    per_source = Counter(r["source_path"] for r in clips)
    assert {s["source_path"]: s["clips"] for s in summary["sources"]["rows"] if s["clips"]} == dict(per_source)
    assert summary["errors"]["split"]["rows"] == summary["totals"]["source_errors"] == 3
    # The old short funnel agrees.
    f = funnel(run_dir)
    assert f["kept"] == summary["totals"]["kept"] and f["rejections"].keys() == summary["reasons"].keys()


def test_scores_thresholds_and_not_computed(report):
    motion = report["scores"]["motion_score"]
    assert motion["computed"] and motion["values"] == report["totals"]["clips"]
    assert sorted(t["value"] for t in motion["thresholds"]) == [1.0, 5.0]
    assert motion["quantiles"]["p0"] <= motion["quantiles"]["p50"] <= motion["quantiles"]["p100"]
    assert sum(motion["histogram"]["kept"]) == motion["kept"] == report["totals"]["kept"]
    # The spine computes no aesthetic score: shown as not computed, not as zeros.
    assert report["scores"]["aesthetic_score"]["computed"] is False
    assert "not computed: " in format_summary(report) and "aesthetic_score" in format_summary(report)


def test_galleries_are_borderline_first_and_the_page_is_self_contained(run_dir, report):
    for rule_id, g in report["galleries"].items():
        distances = [item["distance"] for item in g["rejected"]]
        assert distances == sorted(distances) and all(d > 0 for d in distances)
        inside = [item["distance"] for item in g["kept_strip"]]
        assert inside == sorted(inside) and all(d >= 0 for d in inside)
    motion = report["galleries"]["filter.motion_score"]
    assert len(motion["rejected"]) == motion["rejected_total"] >= 3  # small run: every one shown
    html = (run_dir / "report" / "index.html").read_text()
    # Everything inline: no http(s) reference, one embedded image per thumbnail and plot.
    assert "http://" not in html and "https://" not in html and "src='plots/" not in html and 'src="plots/' not in html
    assert html.count("data:image/jpeg;base64,") == report["page"]["thumbnails"] > 0
    assert html.count("data:image/png;base64,") == len(report["plots"]) >= 3
    assert html.count("data:video/mp4;base64,") == report["page"]["videos"] > 0
    for plot in report["plots"]:
        assert (run_dir / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (run_dir / "report" / "sources.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + report["sources"]["total"]
    assert f"{report['totals']['kept']} kept" in format_summary(report)


def test_skipped_steps_rules_not_applied_and_unfinished_refilter_are_shown(run_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("report"))
    run = json.loads((out / "run.json").read_text())
    # What preflight records when a model stage could not run (curate run
    # --skip-unavailable-models): the step and its rule are gone from the config, and listed.
    run["skipped_steps"] = [{"step": "aesthetics", "stage": "aesthetics", "columns": ["aesthetic_score"],
                             "reason": "weights missing:\n  step 'aesthetics': head: not found"}]
    run["rules_not_applied"] = [{"step": "filter", "column": "aesthetic_score", "rule": {"min": 4.5}}]
    # And a refilter killed part-way (refilter records its config first, then rewrites).
    run["refilters"] = [{"overrides": ["filter.rules.duration_s.min=3"], "finished": False}]
    (out / "run.json").write_text(json.dumps(run))
    summary = write_report(out)
    assert "WARNING" in format_summary(summary) and "duration_s.min=3" in format_summary(summary)
    rule = next(r for r in summary["rules"] if r["column"] == "aesthetic_score")
    assert rule["applied"] is False and rule["rejected"] == 0 and rule["threshold"] == "min 4.5"
    assert "filter.aesthetic_score" not in summary["galleries"] and "filter.motion_score" in summary["galleries"]
    assert "NOT APPLIED: stage aesthetics skipped" in format_summary(summary)
    assert summary["funnel"][-1]["remaining"] == summary["totals"]["kept"]
    assert all(r["applied"] for r in summary["rules"] if r["column"] != "aesthetic_score")
    html = (out / "report" / "index.html").read_text()
    assert "rule not applied: <b>aesthetic_score</b>" in html and "weights missing" in html


def test_large_run_page_stays_small(tmp_path):
    """Thousands of clips: galleries are sampled and capped, the counts still add up."""
    bench = load_bench()
    out = tmp_path / "out"
    bench.make_synthetic_run(out, n_clips=4000, sources_per_unit=40, video_every=3)
    summary = write_report(out, max_gallery=6, max_strip=3, max_videos=2)
    n_rules = len(summary["rules"])
    assert summary["totals"]["clips"] > 3000
    assert summary["page"]["thumbnails"] <= n_rules * (6 + 3)
    assert summary["page"]["videos"] == 2
    assert summary["page"]["bytes"] < 1_000_000
    assert summary["funnel"][-1]["remaining"] == summary["totals"]["kept"]
    for g in summary["galleries"].values():
        # The closest ones first, then a spread reaching far from the threshold.
        assert len(g["rejected"]) == 6 and g["rejected_total"] > 6
        d = [item["distance"] for item in g["rejected"]]
        assert d == sorted(d)
    # Percentile rules: resolved over the run, ~25% dropped at each (distinct random values).
    aesthetic = next(r for r in summary["rules"] if r["column"] == "aesthetic_score")
    assert aesthetic["resolved"]["min"] == aesthetic["effective"]["min"]
    assert aesthetic["rejected"] == int(0.25 * aesthetic["resolved"]["values"])
