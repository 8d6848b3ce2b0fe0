"""The report page in a real headless browser (Debian's chromium, driven by playwright).

Set-up (the project's test set-up does it): `apt-get install -y chromium` and the `playwright`
Python package; playwright's own browser download is never used (`executable_path`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from curation.config import load_config
from curation.report import write_report
from curation.runner import run_local, run_pipeline

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CURATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OVERRIDES = ["split.min_duration_s=1.0", "run.sources_per_unit=2", "filter.rules.duration_s.min=2.8"]


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: the test set-up installs it (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: the test extra installs it (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def report(footage, tmp_path_factory):
    root, _ = footage
    out = tmp_path_factory.mktemp("browser") / "out"
    run_pipeline(load_config(REPO / "configs" / "spine.yaml", OVERRIDES), [str(root)], out, run_local)
    return out, write_report(out)


def test_page_loads_with_galleries_plots_and_playable_videos(browser, report):
    out, summary = report
    page_path = out / "report" / "index.html"
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    network: list[str] = []
    # Self-contained: any request that is not the page itself is recorded and refused.
    context.route("**/*", lambda route: (network.append(route.request.url), route.abort())
                  if not route.request.url.startswith(("file:", "data:")) else route.continue_())
    page = context.new_page()
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(page_path.as_uri(), wait_until="load")

    # Every video has decoded a frame (H.264 plays), within a few seconds.
    videos = page.evaluate("""async () => {
        const vs = [...document.querySelectorAll('video')];
        await Promise.all(vs.map(v => v.readyState >= 2 ? null : new Promise(done => {
            v.addEventListener('loadeddata', done); v.addEventListener('error', done);
            setTimeout(done, 10000); })));
        return vs.map(v => ({ready: v.readyState, duration: v.duration, error: v.error && v.error.code,
                             width: v.videoWidth}));
    }""")
    assert len(videos) == summary["page"]["videos"] > 0
    assert all(v["error"] is None and v["ready"] >= 2 and v["duration"] > 0 and v["width"] > 0 for v in videos), videos

    galleries = page.locator("section.rule-gallery")
    assert galleries.count() == len(summary["galleries"]) >= 2
    thumbs = page.evaluate("[...document.querySelectorAll('.gallery img')].map(i => i.complete && i.naturalWidth)")
    assert len(thumbs) == summary["page"]["thumbnails"] > 0 and all(w and w > 0 for w in thumbs)
    plots = page.evaluate("[...document.querySelectorAll('img.plot')].map(i => i.complete && i.naturalWidth)")
    assert len(plots) == len(summary["plots"]) >= 3 and all(w and w > 100 for w in plots)
    assert page.locator("#funnel").is_visible() and page.locator("#galleries").is_visible()

    shot = out / "report" / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    context.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert errors == [] and network == []
