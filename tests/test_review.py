"""`curate review`: the page's counts come from refilter's code and equal `curate refilter`'s;
the server refuses requests without its token and thresholds that are not numbers; the page
in a real browser follows a dragged handle."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import urllib.error
import urllib.request
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.refilter import refilter
from curation.review import Review, ReviewError, ReviewServer
from curation.writer import OutputStore
from stages.rules import reason_column

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from scale_bench import fabricate  # noqa: E402  (a committed output of real score columns, in seconds)

ABSOLUTE = {"duration_s": {"min": 4.0}, "motion_score": {"min": 2.5}, "text_area_ratio": {"max": 0.05}}
PERCENTILE = {"duration_s": {"min": 3.0}, "motion_score": {"drop_bottom": 0.3}, "text_area_ratio": {"drop_top": 0.1}}


@pytest.fixture(scope="module")
def run_out(tmp_path_factory) -> Path:
    """About 5,000 clip rows of 500 sources (3% unreadable) in 125 units, compacted."""
    base = tmp_path_factory.mktemp("review")
    fabricate(base / "out", 5000, base / "sources")
    # The fabricated rows are all kept: the rules applied once, as a run's end would.
    refilter(base / "out", ["filter.rules.duration_s.min=2.0"])
    return base / "out"


@contextlib.contextmanager
def serving(review: Review):
    """A started server of `review` and its token header; closed after."""
    server = ReviewServer(review).start()
    try:
        yield server, {"X-Review-Token": server.token}
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(run_out):
    with serving(Review(run_out)) as (srv, _):
        yield srv


def call(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def motion_gallery(server, rules: dict, n: int) -> dict:
    """The clips just kept and dropped at motion_score's threshold under `rules`."""
    status, g = call(f"{server.base}/api/gallery", {"rules": {"filter": rules}, "step": "filter",
                                                    "column": "motion_score", "n": n}, {"X-Review-Token": server.token})
    assert status == 200, g
    return g


def refiltered(run_out: Path, tmp_path: Path, rules: dict) -> dict:
    """`curate refilter` with these rules on a copy: kept, and per rule what its stored reasons
    say (rejects, alone, the funnel after it, overlaps), read back from the rewritten scores."""
    out = tmp_path / "copy"
    shutil.copytree(run_out, out)
    result = refilter(out, [f"filter.rules.{c}={json.dumps(b)}" for c, b in rules.items()])
    table = OutputStore(out).read_scores()
    names = list(rules)  # validated rules are in column-name order, as here
    per_row = [{reason_column(r) for r in reasons}
               for reasons, start in zip(table.column("reject_reasons").to_pylist(),
                                         table.column("start_frame").to_pylist()) if start is not None]
    after = [sum(1 for cols in per_row if not cols & set(names[:i + 1])) for i in range(len(names))]
    return {"kept": result["kept"], "clips": len(per_row),
            "rejects": [sum(1 for cols in per_row if n in cols) for n in names],
            "alone": [sum(1 for cols in per_row if cols == {n}) for n in names],
            "after": after,
            "overlaps": {(a, b): sum(1 for cols in per_row if {a, b} <= cols) for a, b in combinations(names, 2)}}


@pytest.mark.parametrize("rules", [ABSOLUTE, PERCENTILE], ids=["absolute", "percentile"])
def test_the_pages_counts_equal_refilters(server, run_out, tmp_path, rules):
    status, page = call(f"{server.base}/api/evaluate", {"rules": {"filter": rules}}, {"X-Review-Token": server.token})
    assert status == 200, page
    truth = refiltered(run_out, tmp_path, rules)
    assert page["clips"] == truth["clips"] and page["kept"] == truth["kept"]
    assert page["duplicates"] == 0
    assert [r["column"] for r in page["rules"]] == list(rules)
    assert [r["rejects"] for r in page["rules"]] == truth["rejects"]
    assert [r["alone"] for r in page["rules"]] == truth["alone"]
    assert [r["after"] for r in page["rules"]] == truth["after"]
    names = list(rules)
    for (a, b), n in truth["overlaps"].items():
        assert page["overlaps"][names.index(a)][names.index(b)] == n == page["overlaps"][names.index(b)][names.index(a)]
    assert all(r["rejects"] > 0 for r in page["rules"]) and page["kept"] < page["clips"]  # every rule bites here


def test_the_state_holds_the_runs_rules_and_histograms(server):
    status, state = call(f"{server.base}/api/state?token={server.token}")
    assert status == 200
    assert state["rules"] == {"filter": {"duration_s": {"min": 2.0}, "motion_score": {"min": 1.0},
                                         "text_area_ratio": {"max": 0.07}}}
    h = state["histograms"]["motion_score"]
    assert sum(h["counts"]) + h["missing"] == state["clips"] and len(h["edges"]) == len(h["counts"]) + 1
    assert state["evaluation"]["kept"] == OutputStore(Path(state["out_dir"])).ledger().totals()["kept"]


def test_every_request_without_the_token_is_refused(server):
    for url, body, headers in [(f"{server.base}/", None, {}), (f"{server.base}/api/state", None, {}),
                               (f"{server.base}/api/state?token=wrong", None, {}),
                               (f"{server.base}/api/evaluate", {"rules": {"filter": ABSOLUTE}}, {}),
                               (f"{server.base}/api/evaluate", {"rules": {"filter": ABSOLUTE}},
                                {"X-Review-Token": server.token[:-1]}),
                               (f"{server.base}/nothing", None, {})]:
        status, answer = call(url, body, headers)
        assert status == 403, (url, headers)
        assert "token" in answer["error"]
    with urllib.request.urlopen(f"{server.base}/?token={server.token}", timeout=30) as r:
        assert r.status == 200 and b"curate review" in r.read()


def test_a_threshold_typed_as_text_is_refused_with_a_message(server):
    for bounds, says in [({"min": "abc"}, "motion_score.min must be a number, got 'abc'"),
                         ({"drop_bottom": 1.5}, "strictly between 0 and 1"),
                         ({"min": 3, "max": 1}, "min 3 > max 1")]:
        status, answer = call(f"{server.base}/api/evaluate", {"rules": {"filter": {"motion_score": bounds}}},
                              {"X-Review-Token": server.token})
        assert status == 400 and says in answer["error"], answer
    status, answer = call(f"{server.base}/api/evaluate", {"rules": {"nofilter": {}}}, {"X-Review-Token": server.token})
    assert status == 400 and "unknown filter step" in answer["error"]


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(ReviewError, match="not a curation output"):
        Review(tmp_path)



def test_the_gallery_holds_the_clips_nearest_the_threshold(server, run_out, tmp_path):
    rules = {"duration_s": {"min": 2.0}, "motion_score": {"min": 2.5}, "text_area_ratio": {"max": 0.07}}
    g = motion_gallery(server, rules, 5)
    assert len(g["kept"]) == 5 and len(g["dropped"]) == 5
    # Brute force over what refilter stores under the same rules: among the clips no other
    # rule rejects, the kept ones just above 2.5 and the dropped ones just below, nearest first.
    out = tmp_path / "copy"
    shutil.copytree(run_out, out)
    refilter(out, [f"filter.rules.{c}={json.dumps(b)}" for c, b in rules.items()])
    rows = [r for r in OutputStore(out).read_scores().to_pylist() if r["start_frame"] is not None]
    others = [r for r in rows if not {reason_column(x) for x in r["reject_reasons"]} - {"motion_score"}]
    kept = sorted((r for r in others if r["keep"]), key=lambda r: abs(r["motion_score"] - 2.5))[:5]
    dropped = sorted((r for r in others if not r["keep"]), key=lambda r: abs(r["motion_score"] - 2.5))[:5]
    assert [c["clip_id"] for c in g["kept"]] == [r["clip_id"] for r in kept]
    assert [c["clip_id"] for c in g["dropped"]] == [r["clip_id"] for r in dropped]
    stored = {r["clip_id"]: r for r in rows}
    for c in g["kept"] + g["dropped"]:  # each card: its source, span, scores and every reason, as stored
        r = stored[c["clip_id"]]
        assert c["reasons"] == r["reject_reasons"] and c["source"] == r["source_path"]
        assert c["start_s"] == r["start_s"] and c["scores"]["motion_score"] == r["motion_score"]


def test_a_clip_is_served_with_range_requests(server, run_out):
    g = motion_gallery(server, ABSOLUTE, 1)
    clip_id = g["kept"][0]["clip_id"]
    clips = pa.concat_tables(pq.read_table(f, columns=["clip_id", "video"])
                             for f in OutputStore(run_out).committed_files("clips"))
    stored = dict(zip(clips.column("clip_id").to_pylist(), clips.column("video").to_pylist()))[clip_id]
    url = f"{server.base}/clip/{clip_id}.mp4?token={server.token}"
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200 and r.headers["Accept-Ranges"] == "bytes" and r.read() == stored
    request = urllib.request.Request(url, headers={"Range": "bytes=10-99"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 206 and r.headers["Content-Range"] == f"bytes 10-99/{len(stored)}"
        assert r.read() == stored[10:100]
    request = urllib.request.Request(url, headers={"Range": "bytes=-16"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 206 and r.read() == stored[-16:]
    assert call(f"{server.base}/clip/{clip_id}.mp4")[0] == 403
    assert call(f"{server.base}/clip/nope.mp4?token={server.token}")[0] == 404


def test_labels_are_saved_measured_against_the_rules_and_survive_a_restart(run_out, tmp_path):
    out = tmp_path / "labelled"
    shutil.copytree(run_out, out)
    with serving(Review(out)) as (server, token):
        rules = {"rules": {"filter": ABSOLUTE}}
        g = motion_gallery(server, ABSOLUTE, 3)
        just_kept, just_dropped = [c["clip_id"] for c in g["kept"]], [c["clip_id"] for c in g["dropped"]]
        # The reviewer disagrees with the rule on all six: kept ones are drops, dropped ones keeps.
        for clip_id in just_kept:
            assert call(f"{server.base}/api/label", {"clip_id": clip_id, "label": "drop"}, token)[0] == 200
        for clip_id in just_dropped:
            assert call(f"{server.base}/api/label", {"clip_id": clip_id, "label": "keep"}, token)[0] == 200
        status, a = call(f"{server.base}/api/agreement", rules, token)
        assert (a["labelled"], a["labelled_keep"], a["labelled_drop"]) == (6, 3, 3)
        assert (a["agree"], a["dropped_but_keep"], a["kept_but_drop"]) == (0, 3, 3)
        by_rule = {r["column"]: r for r in a["rules"]}
        assert by_rule["motion_score"]["rejects_keep"] == 3 and by_rule["motion_score"]["passes_drop"] == 3
        assert by_rule["duration_s"]["rejects_keep"] == 0 and by_rule["duration_s"]["passes_drop"] == 3
        # A label changed: the figures follow.
        call(f"{server.base}/api/label", {"clip_id": just_kept[0], "label": "keep"}, token)
        assert call(f"{server.base}/api/agreement", rules, token)[1]["agree"] == 1
        assert call(f"{server.base}/api/label", {"clip_id": just_kept[0], "label": "maybe"}, token)[0] == 400
        assert call(f"{server.base}/api/label", {"clip_id": "no-such-clip", "label": "keep"}, token)[0] == 400
    saved = json.loads((out / "review" / "labels.json").read_text())["labels"]
    assert {c: e["label"] for c, e in saved.items()} == {**{c: "drop" for c in just_kept[1:]}, just_kept[0]: "keep",
                                                          **{c: "keep" for c in just_dropped}}
    again = Review(out)  # a restarted server reads them back
    evaluation = again.data.evaluate(again.parse_rules(rules))
    assert again.labels.agreement(evaluation)["agree"] == 1


def test_the_proposed_threshold_agrees_best_with_the_labels_and_ties_go_looser():
    from curation.review.labels import best_threshold

    values = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    keep = np.array([False, False, True, False, True, True])
    # min: 1.5 agrees with 5 (drops 0.5 and 1.0; keeps 1.5, 3, 4; the drop at 2.0 passes);
    # 3.0 agrees with 5 too (drops all three drops, loses the keep at 1.5): the looser, 1.5, wins.
    assert best_threshold(values, keep, "min") == (1.5, 5)
    assert best_threshold(values, ~keep, "max") == (2.0, 5)  # mirrored: the highest max of the best
    assert best_threshold(values, np.ones(6, bool), "min") == (None, 6)  # all keep: no bound
    assert best_threshold(values, np.zeros(6, bool), "min") == (np.nextafter(4.0, np.inf), 6)  # all drop
    rng = np.random.default_rng(7)
    for _ in range(200):  # against every candidate, by brute force
        v = rng.integers(0, 8, 12).astype(float)
        k = rng.random(12) < 0.5
        t, agree = best_threshold(v, k, "min")
        cuts = set(v) | {np.nextafter(v.max(), np.inf)}
        scores = {None: int(k.sum()), **{c: int((k & (v >= c)).sum() + (~k & (v < c)).sum()) for c in cuts}}
        top = max(scores.values())
        assert agree == top and t == min((c for c, s in scores.items() if s == top),
                                         key=lambda c: -np.inf if c is None else c)


def test_save_writes_only_the_rules_and_refilter_with_that_config_keeps_the_pages_clips(run_out, tmp_path):
    import yaml

    from curation.config import load_config
    from curation.review.save import overrides
    from stages.rules import filter_steps

    config = tmp_path / "spine.yaml"
    shutil.copyfile(REPO / "configs" / "spine.yaml", config)
    original = config.read_text()
    review = Review(run_out, config)
    rules = {"rules": {"filter": {"duration_s": {"min": 3.0}, "motion_score": {"drop_bottom": 0.2},
                                  "text_area_ratio": {"max": 0.05}}}}
    with serving(review) as (server, token):
        status, preview = call(f"{server.base}/api/save", rules, token)
        assert status == 200 and preview["changed"] and not preview["written"]
        assert config.read_text() == original  # the diff first, nothing written
        changed = [line for line in preview["diff"].splitlines()
                   if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        assert changed and all(("_s:" in line or "_score:" in line or "_ratio:" in line) for line in changed)
        status, written = call(f"{server.base}/api/save", {**rules, "write": True}, token)
        assert status == 200 and written["written"] and written["diff"] == preview["diff"]
        page_keep = call(f"{server.base}/api/evaluate", rules, token)[1]["kept"]
    text = config.read_text()
    assert "# Below 1: practically static shots" in text  # comments kept
    before, after = yaml.safe_load(original), yaml.safe_load(text)
    for step in before["steps"] + after["steps"]:  # everything but the rules as it was
        if step["stage"] == "filter":
            step["args"].pop("rules")
    assert before == after
    saved = filter_steps(load_config(config).to_dict())
    assert saved == review.parse_rules(rules)
    # `curate refilter` with the saved config's rules keeps exactly the page's clips.
    copy = tmp_path / "copy"
    shutil.copytree(run_out, copy)
    result = refilter(copy, overrides(filter_steps(OutputStore(copy).read_run()["config"]), saved))
    kept_ids = {r["clip_id"] for r in OutputStore(copy).read_scores().to_pylist() if r["keep"]}
    page_ids = set(review.data.clip_ids.filter(pa.array(review.data.evaluate(saved).keep)).to_pylist())
    assert result["kept"] == page_keep == len(kept_ids) and kept_ids == page_ids


def test_two_tabs_saving_at_once_leave_one_whole_file(run_out, tmp_path):
    import threading

    import yaml

    config = tmp_path / "spine.yaml"
    shutil.copyfile(REPO / "configs" / "spine.yaml", config)
    a = {"duration_s": {"min": 3.0}, "motion_score": {"min": 2.0}}
    b = {"duration_s": {"min": 2.5}, "motion_score": {"drop_bottom": 0.3}, "text_area_ratio": {"max": 0.05}}
    failures: list[str] = []

    def tab(rules):
        for _ in range(15):
            status, answer = call(f"{server.base}/api/save", {"rules": {"filter": rules}, "write": True}, token)
            if status != 200:
                failures.append(str(answer))

    with serving(Review(run_out, config)) as (server, token):
        threads = [threading.Thread(target=tab, args=(r,)) for r in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures
    rules = yaml.safe_load(config.read_text())["steps"][-1]["args"]["rules"]
    assert rules in (a, b)
    assert not list(tmp_path.glob(".*.tmp"))


def test_apply_runs_refilter_and_the_page_reloads(run_out, tmp_path):
    out = tmp_path / "applied"
    shutil.copytree(run_out, out)
    with serving(Review(out)) as (server, token):
        expected = call(f"{server.base}/api/evaluate", {"rules": {"filter": ABSOLUTE}}, token)[1]["kept"]
        status, applied = call(f"{server.base}/api/apply", {"rules": {"filter": ABSOLUTE}}, token)
        assert status == 200 and applied["kept"] == expected
        run = OutputStore(out).read_run()
        assert run["refilters"][-1]["finished"] and run["config"]["steps"][-1]["args"]["rules"] == ABSOLUTE
        state = call(f"{server.base}/api/state?token={server.token}")[1]
        assert state["rules"] == {"filter": ABSOLUTE} and state["evaluation"]["kept"] == expected
        assert OutputStore(out).ledger().totals()["kept"] == expected
        # Without --config, Save writes the run's config with the rules beside the output.
        call(f"{server.base}/api/save", {"rules": {"filter": ABSOLUTE}, "write": True}, token)
    from curation.config import load_config

    assert load_config(out / "review" / "pipeline.yaml").to_dict()["steps"][-1]["args"]["rules"] == ABSOLUTE


def test_saving_into_the_shipped_pipeline_changes_its_rules_lines_only():
    """pipeline.yaml has a flow mapping wrapped over two lines, which a YAML dump would reflow:
    only the rules block is taken from the dump."""
    from curation.review.save import diff, with_rules

    text = (REPO / "pipeline.yaml").read_text()
    new = with_rules(text, [("filter", {"duration_s": {"min": 2.5}, "motion_score": {"drop_bottom": 0.25},
                                        "text_area_ratio": {"max": 0.07}})])
    changed = [line for line in diff(text, new, "pipeline.yaml").splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert sorted(changed) == sorted(["-        motion_score: {min: 1.0}        # % of short side per second; "
                                      "below 1 is practically static",
                                      "+        motion_score: {drop_bottom: 0.25} # % of short side per second; "
                                      "below 1 is practically static",
                                      "-        duration_s: {min: 2.0}", "+        duration_s: {min: 2.5}",
                                      "-        aesthetic_score: {drop_bottom: 0.5}"])


def with_a_duplicate(run_out: Path, out: Path) -> tuple[str, str]:
    """A copy of the output in which one kept clip is rejected as a duplicate of another
    source's clip, as the dedup pass writes it: (the duplicate, the clip it duplicates)."""
    shutil.copytree(run_out, out)
    (path,) = OutputStore(out).committed_files("scores")
    table = pq.read_table(path)
    rows = table.to_pylist()
    kept = [i for i, r in enumerate(rows) if r["keep"]]
    dup, original = rows[kept[0]], rows[next(i for i in kept if rows[i]["source_id"] != rows[kept[0]]["source_id"])]
    dup["keep"], dup["reject_reasons"] = False, [f"duplicate_of:{original['clip_id']}"]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return dup["clip_id"], original["clip_id"]


def test_a_source_shows_every_row_in_order_with_its_duplicate_links(run_out, tmp_path):
    duplicate, original = with_a_duplicate(run_out, tmp_path / "dup")
    review = Review(tmp_path / "dup")
    rules = {"rules": {"filter": ABSOLUTE}}
    stored = OutputStore(tmp_path / "dup").read_scores().to_pylist()
    by_id = {r["clip_id"]: r for r in stored}
    source = review.source({**rules, "clip_id": duplicate})
    assert source["source_id"] == by_id[duplicate]["source_id"]
    mine = [r for r in stored if r["source_id"] == source["source_id"]]
    assert [c.get("clip_id") for c in source["rows"]] == [r["clip_id"] if r["start_frame"] is not None else None
                                                         for r in mine]
    starts = [c["start_s"] for c in source["rows"] if "clip_id" in c]
    assert starts == sorted(starts)
    card = next(c for c in source["rows"] if c.get("clip_id") == duplicate)
    assert card["duplicate_of"] == {"clip_id": original, "source_id": by_id[original]["source_id"]}
    assert not card["kept"] and "duplicate (as the run decided)" in card["reasons"]
    evaluation = review.data.evaluate(review.parse_rules(rules))
    kept_ids = set(review.data.clip_ids.filter(pa.array(evaluation.keep)).to_pylist())
    assert all(c["kept"] == (c["clip_id"] in kept_ids) for c in source["rows"] if "clip_id" in c)
    # An unreadable source is its one error row, with the reason.
    broken = next(r for r in stored if r["start_frame"] is None)
    rows = review.source({**rules, "source_id": broken["source_id"]})["rows"]
    assert rows == [{"error": broken["split_error"]}] and broken["split_error"]
    with pytest.raises(ValueError, match="no source"):
        review.source({**rules, "source_id": "nope"})


def test_the_sources_outcomes_follow_the_rules(server, run_out, tmp_path):
    status, s = call(f"{server.base}/api/sources", {"rules": {"filter": ABSOLUTE}, "n": 5},
                     {"X-Review-Token": server.token})
    assert status == 200, s
    out = tmp_path / "copy"
    shutil.copytree(run_out, out)
    refilter(out, [f"filter.rules.{c}={json.dumps(b)}" for c, b in ABSOLUTE.items()])
    per: dict[str, list[int]] = {}
    status_of: dict[str, str] = {}
    for r in OutputStore(out).read_scores().to_pylist():
        counts = per.setdefault(r["source_id"], [0, 0])
        if r["start_frame"] is None:
            status_of[r["source_id"]] = r["source_status"]
        else:
            counts[0] += 1
            counts[1] += bool(r["keep"])
    assert s["total"] == len(per)
    expected = {"with kept clips": sum(1 for c, k in per.values() if k),
                "every clip rejected": sum(1 for c, k in per.values() if c and not k)}
    for sid, st in status_of.items():
        if not per[sid][0]:
            expected[st] = expected.get(st, 0) + 1
    assert s["outcomes"] == expected and expected.get("unreadable")  # the fabricated 3% unreadable
    lost = sorted((c - k for c, k in per.values()), reverse=True)[:5]
    assert [r["clips"] - r["kept"] for r in s["most_rejected"]] == lost
    for r in s["most_rejected"]:
        assert [r["clips"], r["kept"]] == per[r["source_id"]]
