"""`curate review OUT_DIR`: tune the filters by looking, on a local web page.

The page shows the rules as they stand (the funnel, each rule's rejects and those it alone
rejects, the overlaps between rules) and a histogram of each ruled score with its thresholds
as handles. A handle dragged (or a threshold typed) asks the server, which evaluates the
rules with `curate refilter`'s own code on the run's score columns held in memory
(data.py), so the page and refilter cannot disagree. Two galleries follow the chosen rule:
the clips just kept and just dropped at its threshold, each playing its own mp4 from the
output on hover.

  data.py     the held columns and the evaluation (ReviewData, Evaluation), the clips
              nearest a threshold
  payload.py  a clip's stored mp4 and caption, found by its place among the clip rows
  labels.py   reviewers' keep/drop labels (OUT_DIR/review/labels.json), their agreement
              with the rules, and the thresholds that agree best with them
  save.py     the rules written into a config (only its rules lines changed) and applied
              as `curate refilter` does
  server.py   the HTTP server, its token and routes (Review, ReviewServer)
  the page is curation/templates/review.html, in the report's frame and style (no external
  script, style or font: nothing leaves the machine)
"""

from __future__ import annotations

import logging
import os
import sys
import time
import webbrowser

from curation.review.data import Evaluation, ReviewData
from curation.review.server import Review, ReviewError, ReviewServer

log = logging.getLogger(__name__)


def serve(out_dir: str, config: str | None = None, host: str = "127.0.0.1", port: int = 0,
          browser: bool = True) -> int:
    """Load OUT_DIR's scores, start the server, print its address (with the token), open a
    browser where there is a display, and serve until interrupted."""
    started = time.monotonic()
    review = Review(out_dir, config)
    server = ReviewServer(review, host, port).start()
    print(f"curate review: {review.data.clips:,} clips of {out_dir} loaded in {time.monotonic() - started:.1f}s\n"
          f"    {server.url}\n(Ctrl-C stops it)", flush=True)
    if browser and (sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY")
                    or os.environ.get("WAYLAND_DISPLAY")):
        webbrowser.open(server.url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("review: stopped")
    finally:
        server.close()
    return 0


__all__ = ["Evaluation", "Review", "ReviewData", "ReviewError", "ReviewServer", "serve"]
