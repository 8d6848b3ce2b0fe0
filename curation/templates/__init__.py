"""The HTML templates the report (`curate report`) and the review page (`curate review`) share
(Jinja2, autoescaped: every string from the data is escaped unless a template says otherwise).

  base.html    the page's frame: head, the shared style (style.css), a title and a body block
  macros.html  a table, and a gallery card of the report
  report.html  the report (curation/report/html.py hands it the summary and the media)
  review.html  the review page (curation/review/server.py serves it; its data come from the API)
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from stages.rules import fmt

HERE = Path(__file__).parent


def num(value: Any) -> Any:
    """A table cell: floats to 4 significant digits, ints with thousands separators, markup as is."""
    if isinstance(value, Markup):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE)), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=num, minutes=minutes, fmt=fmt)
    env.globals.update(lefts=lambda left: left if isinstance(left, (set, list, tuple)) else range(left))
    return env


def render(name: str, **context: Any) -> str:
    return environment().get_template(name).render(**context)
