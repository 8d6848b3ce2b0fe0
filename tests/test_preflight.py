"""Missing model weights: an error before Ray starts, or skipped loudly with the option."""

from __future__ import annotations

import json

import pytest
import yaml

from curation.cli import main
from curation.config import ConfigError, parse_config
from curation.preflight import preflight
from curation.report import write_report

RAW = {
    "run": {"sources_per_unit": 3},
    "steps": [
        {"stage": "split", "args": {"min_duration_s": 1.0}},
        {"stage": "motion"},
        {"stage": "aesthetics", "args": {"head_path": "/nonexistent/head.pth", "pretrained": "/nonexistent/clip.pt"}},
        {"stage": "filter", "args": {"rules": {"motion_score": {"min": 1.0}, "aesthetic_score": {"min": 4.5}}}},
        {"stage": "caption", "args": {"backend": "endpoint", "endpoint_url": "http://127.0.0.1:9/v1",
                                      "endpoint_model": "m"}},
        {"stage": "clip_similarity", "args": {"pretrained": "/nonexistent/clip.pt"}},
        {"stage": "filter", "name": "final", "args": {"rules": {"clip_similarity": {"min": 0.2}}}},
    ],
}


def test_missing_weights_name_file_and_key():
    with pytest.raises(ConfigError) as err:
        preflight(parse_config(RAW))
    text = str(err.value)
    for expected in ("aesthetics.head_path", "/nonexistent/head.pth", "aesthetics.pretrained",
                     "clip_similarity.pretrained", "--skip-unavailable-models"):
        assert expected in text
    assert "caption" not in text.split("Fix the paths")[0]  # the endpoint needs no weights


def test_skipping_removes_steps_and_their_rules():
    checked = preflight(parse_config(RAW), skip_unavailable=True)
    assert [s.name for s in checked.config.steps] == ["split", "motion", "filter", "caption", "final"]
    assert checked.config.step("filter").args["rules"] == {"motion_score": {"min": 1.0}}
    assert checked.config.step("final").args["rules"] == {}
    assert {r["column"] for r in checked.rules_not_applied} == {"aesthetic_score", "clip_similarity"}
    assert {s["step"] for s in checked.skipped_steps} == {"aesthetics", "clip_similarity"}


def test_cli_stops_before_anything_starts_without_the_option(tmp_path, footage):
    root, _ = footage
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(RAW))
    code = main(["run", str(config), "--input", str(root), "--output", str(tmp_path / "out"), "--runner", "local"])
    assert code == 2
    assert not (tmp_path / "out").exists()


def test_cli_skip_option_runs_and_records_it(tmp_path, footage):
    root, _ = footage
    raw = {**RAW, "steps": [s for s in RAW["steps"] if s["stage"] not in ("caption",)]}
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    code = main(["run", str(config), "--input", str(root), "--output", str(out), "--runner", "local",
                 "--skip-unavailable-models"])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert {s["step"] for s in run["skipped_steps"]} == {"aesthetics", "clip_similarity"}
    assert {r["column"] for r in run["rules_not_applied"]} == {"aesthetic_score", "clip_similarity"}
    assert [s["name"] for s in run["config"]["steps"]] == ["split", "motion", "filter", "final"]
    write_report(out)
    page = (out / "report" / "index.html").read_text()
    assert "not applied" in page and "aesthetic_score" in page
