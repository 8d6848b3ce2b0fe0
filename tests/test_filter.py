"""The filter stage: every rule on every row, all reasons, nothing dropped."""

from __future__ import annotations

import math

import pytest

from stages.filter import FilterStage


def batch(**cols):
    n = len(next(iter(cols.values())))
    base = {"clip_id": [f"c{i}" for i in range(n)], "split_error": [None] * n, "start_frame": [0] * n}
    return {**base, **cols}


def test_every_rule_every_row_all_reasons():
    f = FilterStage(rules={"motion_score": {"min": 1.0, "max": 30}, "duration_s": {"min": 2}})
    out = f(batch(motion_score=[5.0, 0.2, math.nan, 50.0], duration_s=[3.0, 1.0, 3.0, 3.0]))
    assert out["keep"] == [True, False, False, False]
    assert out["reject_reasons"] == [[], ["duration_s<2", "motion_score<1"],
                                     ["motion_score:missing"], ["motion_score>30"]]
    assert len(out["clip_id"]) == 4  # drops nothing


def test_earlier_reasons_are_kept_and_missing_columns_count_as_missing():
    f = FilterStage(rules={"aesthetic_score": {"min": 4.5}})
    out = f(batch(reject_reasons=[["motion_score<1"], []], motion_score=[0.1, 9.0]))
    assert out["reject_reasons"] == [["motion_score<1", "aesthetic_score:missing"],
                                     ["aesthetic_score:missing"]]
    assert out["keep"] == [False, False]


def test_source_error_rows_are_rejected_as_such():
    f = FilterStage(rules={"motion_score": {"min": 1.0}})
    out = f({"clip_id": ["e"], "split_error": ["InvalidData"], "start_frame": [None],
             "motion_score": [math.nan]})
    assert out["keep"] == [False] and out["reject_reasons"] == [["split_error"]]


@pytest.mark.parametrize("rules, key", [
    ({"motion": {"min": 1}}, "motion"),
    ({"motion_score": {"minimum": 1}}, "minimum"),
    ({"motion_score": {"min": 3, "max": 1}}, "motion_score"),
    ({"motion_score": {"min": "high"}}, "motion_score.min"),
])
def test_bad_rules_name_the_key(rules, key):
    with pytest.raises(ValueError, match=key):
        FilterStage(rules=rules)


def test_percentile_rules_are_skipped_inline_and_exposed():
    f = FilterStage(rules={"motion_score": {"drop_bottom": 0.25}, "duration_s": {"min": 2}})
    assert f.percentile_rules == {"motion_score": {"drop_bottom": 0.25}}
    out = f(batch(motion_score=[0.0, 9.0, math.nan], duration_s=[3.0, 1.0, 3.0]))
    # Resolved over the whole run at its end (curation/finalize.py): nothing from it here,
    # not even for a missing value.
    assert out["reject_reasons"] == [[], ["duration_s<2"], []]
    assert FilterStage(rules={"motion_score": {"min": 1}}).percentile_rules == {}


@pytest.mark.parametrize("rules, key", [
    ({"motion_score": {"drop_bottom": 0.25, "min": 1}}, "drop_bottom"),
    ({"motion_score": {"drop_top": 1.0}}, "drop_top"),
    ({"motion_score": {"drop_bottom": 0}}, "drop_bottom"),
    ({"motion_score": {"drop_bottom": 0.6, "drop_top": 0.5}}, "motion_score"),
    ({"motion_score": {"drop_bottm": 0.2}}, "drop_bottm"),
])
def test_bad_percentile_rules_name_the_key(rules, key):
    with pytest.raises(ValueError, match=key):
        FilterStage(rules=rules)


def test_percentile_resolution_drops_the_asked_fraction():
    from stages.rules import resolve_percentile

    values = [float(v) for v in range(100)] + [None, math.nan]  # missing values are not ranked
    r = resolve_percentile(values, {"drop_bottom": 0.25, "drop_top": 0.1})
    assert r["values"] == 100
    assert sum(v < r["min"] for v in range(100)) == 25 and sum(v > r["max"] for v in range(100)) == 10
    ties = resolve_percentile([1.0] * 10 + [2.0] * 10, {"drop_bottom": 0.25})
    assert ties["min"] == 1.0  # a tie at the threshold is kept, never split arbitrarily
