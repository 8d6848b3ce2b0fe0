"""The review page in a real headless browser (Debian's chromium, driven by playwright, as the
report's test): a dragged handle moves the threshold, the counts follow, and they equal
`curate refilter`'s for the threshold the page ends on; nothing is fetched from elsewhere."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
import shutil
from pathlib import Path

import pytest

from curation.refilter import refilter
from curation.review import Review, ReviewServer
from test_report_browser import browser  # noqa: F401  (the chromium fixture)
from test_review import run_out  # noqa: F401  (a fabricated, refiltered output)

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def opened(browser, review: Review):  # noqa: F811
    """The review server on `review` and a page in chromium that may fetch nothing from
    elsewhere: (server, page, the outside requests refused, the page's script errors)."""
    server = ReviewServer(review).start()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    outside: list[str] = []
    context.route("**/*", lambda route: (outside.append(route.request.url), route.abort())
                  if not route.request.url.startswith(server.base) else route.continue_())
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield server, page, outside, errors
    finally:
        context.close()
        server.close()


@pytest.fixture
def page_on(browser, run_out):  # noqa: F811
    with opened(browser, Review(run_out)) as session:
        yield session


def test_dragging_a_handle_gives_refilters_counts(page_on, run_out, tmp_path):
    server, page, outside, errors = page_on
    page.goto(server.url)
    kept = page.locator("#kept")
    page.wait_for_function("document.querySelector('#kept').textContent.match(/[0-9]/)")
    before = int(kept.text_content().replace(",", ""))
    handle = page.locator('tr[data-rule="filter.motion_score"] circle.grip')
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 9):  # a drag to the right, in steps, as a hand moves
        page.mouse.move(x + 12 * step, y)
    page.mouse.up()
    threshold = page.locator('input[aria-label="filter.motion_score.min"]')
    page.wait_for_function(
        "([b]) => +document.querySelector('#kept').textContent.replace(/,/g, '') < b", arg=[before])
    page.wait_for_load_state("networkidle")
    value = float(threshold.input_value())
    assert value > 1.0  # the run's rule was min 1.0; the handle went right
    shown = {name: int(page.locator(f'tr[data-rule="filter.motion_score"] .{name}').text_content().replace(",", ""))
             for name in ("rejects", "alone")}
    copy = tmp_path / "copy"
    shutil.copytree(run_out, copy)
    result = refilter(copy, [f"filter.rules.motion_score={json.dumps({'min': value})}"])
    assert int(kept.text_content().replace(",", "")) == result["kept"] < before
    assert shown["rejects"] > 0 and shown["alone"] > 0
    assert not outside and not errors
    # The README's picture of the page: CURATE_SCREENSHOT_DIR=docs/images pytest ... writes it.
    shot = Path(os.environ.get("CURATE_SCREENSHOT_DIR") or tmp_path) / "review.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_a_word_for_a_threshold_is_refused_on_the_page(page_on):
    server, page, outside, errors = page_on
    page.goto(server.url)
    page.wait_for_function("document.querySelector('#kept').textContent.match(/[0-9]/)")
    kept = page.locator("#kept").text_content()
    page.locator('input[aria-label="filter.motion_score.min"]').fill("high")
    page.wait_for_function("document.querySelector('#error').textContent.length > 0")
    assert "must be a number, got 'high'" in page.locator("#error").text_content()
    assert page.locator("#kept").text_content() == kept  # nothing recounted
    assert not outside and not errors


@pytest.fixture(scope="module")
def real_out(footage, tmp_path_factory):
    """A real run of the spine on the generated footage: its clips are real mp4s."""
    from curation.config import load_config
    from curation.runner import run_local, run_pipeline

    out = tmp_path_factory.mktemp("review-real") / "out"
    run_pipeline(load_config(REPO / "configs" / "spine.yaml", ["split.min_duration_s=1.0", "run.sources_per_unit=2"]),
                 [str(footage[0])], out, run_local)
    return out


def test_a_gallery_clip_plays_on_hover(browser, real_out):  # noqa: F811
    with opened(browser, Review(real_out)) as (server, page, outside, errors):
        page.goto(server.url)
        page.wait_for_selector("#just-kept[data-drawn]")  # the first gallery, then the chosen rule's
        drawn = int(page.locator("#just-kept").get_attribute("data-drawn"))
        page.locator('tr[data-rule="filter.motion_score"] td').first.click()
        page.wait_for_function(f"Number(document.querySelector('#just-kept').dataset.drawn) > {drawn} && "
                               "document.querySelector('#just-kept').dataset.column === 'motion_score'")
        page.wait_for_selector(".card video")
        cards = page.locator(".card")
        assert cards.count() >= 2
        card = cards.first
        card.scroll_into_view_if_needed()
        card.hover()
        page.wait_for_function("document.querySelector('.card video').currentTime > 0.3", timeout=20_000)
        assert card.locator(".where").text_content().endswith(" s")  # its source and time span
        assert card.locator(".reasons, .good").first.text_content()  # its reasons, or "kept"
        assert not errors


def test_a_key_labels_the_hovered_clip_and_the_agreement_follows(browser, run_out, tmp_path):  # noqa: F811
    out = tmp_path / "labelled"
    shutil.copytree(run_out, out)
    with opened(browser, Review(out)) as (server, page, outside, errors):
        page.goto(server.url)
        page.wait_for_selector("#just-kept .card")
        assert page.locator("#agreement").text_content() == "No clip labelled yet."
        card = page.locator("#just-kept .card").first
        clip_id = card.get_attribute("data-clip")
        card.scroll_into_view_if_needed()
        card.hover()
        page.keyboard.press("d")
        page.wait_for_function("document.querySelector('#agreement').textContent.startsWith('1 clips')")
        assert "keep 1 labelled drop" in page.locator("#agreement").text_content()  # the rules keep it
        assert "label-drop" in card.get_attribute("class")
        saved = json.loads((out / "review" / "labels.json").read_text())["labels"]
        assert saved[clip_id]["label"] == "drop"
        page.locator("#propose").click()
        page.wait_for_selector("#proposals tr[data-rule='filter.motion_score.min']")
        proposal = page.locator("#proposals tr[data-rule='filter.motion_score.min'] .value").text_content()
        assert proposal.startswith("min ")  # a min just above the clip labelled drop
        assert not errors


def test_save_shows_the_diff_then_writes_the_config(browser, run_out, tmp_path):  # noqa: F811
    config = tmp_path / "spine.yaml"
    shutil.copyfile(REPO / "configs" / "spine.yaml", config)
    original = config.read_text()
    with opened(browser, Review(run_out, config)) as (server, page, outside, errors):
        page.goto(server.url)
        page.wait_for_function("document.querySelector('#kept').textContent.match(/[0-9]/)")
        page.locator('input[aria-label="filter.motion_score.min"]').fill("3.5")
        page.wait_for_function("document.querySelector('#kept').textContent !== ''")
        page.locator("#show-diff").click()
        page.wait_for_function("document.querySelector('#diff').textContent.includes('motion_score')")
        diff = page.locator("#diff").text_content()
        assert "-        motion_score: {min: 1.0}" in diff and "+        motion_score: {min: 3.5}" in diff
        assert config.read_text() == original
        page.locator("#write").click()
        page.wait_for_function("document.querySelector('#saved').textContent.startsWith('written')")
        assert "motion_score: {min: 3.5}" in config.read_text()
        assert "# Below 1: practically static shots" in config.read_text()


def test_links_open_a_source_and_follow_a_duplicate(browser, run_out, tmp_path):  # noqa: F811
    from test_review import with_a_duplicate

    duplicate, original = with_a_duplicate(run_out, tmp_path / "dup")
    review = Review(tmp_path / "dup")
    rows = {c: review.data.source_ids[review.data.source[review.data.row_of(c)]] for c in (duplicate, original)}
    with opened(browser, review) as (server, page, outside, errors):
        page.goto(f"{server.url}#source={rows[duplicate]}")  # a link to a source opens it
        page.wait_for_selector(f"#source-clips .card[data-clip='{duplicate}']")
        n = len(review.data.source_rows(rows[duplicate]))
        assert page.locator("#source-clips .card").count() == n
        assert page.locator("#timeline rect").count() == n
        link = page.locator(f"#source-clips .card[data-clip='{duplicate}'] a.duplicate")
        assert link.text_content() == f"duplicate of {original}"
        link.click()  # to the source of the clip it duplicates
        page.wait_for_selector(f"#source-clips .card[data-clip='{original}']")
        assert page.url.endswith(f"#source={rows[original]}")
        assert not errors and not outside


def test_the_sources_table_lists_the_most_rejected_and_opens_one(page_on, run_out):  # noqa: F811
    server, page, outside, errors = page_on
    page.goto(server.url)
    page.wait_for_selector("#sources tr[data-source]")
    assert "sources:" in page.locator("#source-outcomes").text_content()
    assert "unreadable" in page.locator("#source-outcomes").text_content()
    first = page.locator("#sources tr[data-source]").first
    source_id = first.get_attribute("data-source")
    first.locator("a").click()
    page.wait_for_function("!document.querySelector('#source-view').hidden")
    n = len(Review(run_out).data.source_rows(source_id))
    assert page.locator("#source-clips .card").count() == n
    assert not outside and not errors
