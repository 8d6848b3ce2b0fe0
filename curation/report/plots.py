"""The report's plots as PNG bytes (matplotlib, Agg backend: no display needed).

Every plot is drawn from aggregated numbers (histogram counts, funnel counts, an overlap
matrix) computed by the summary (summary.py), so its cost and size do not grow with the number
of clips.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: the report runs on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KEPT_COLOR = "#2e7d32"
REJECTED_COLOR = "#c62828"
DPI = 80  # small files; the page shows them at about this size


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def funnel_plot(labels: Sequence[str], counts: Sequence[int]) -> bytes:
    """Horizontal bars: clips left after each step of the cascade, top to bottom."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 0.8))
    y = np.arange(len(labels))
    ax.barh(y, counts, color=["#546e7a"] + [REJECTED_COLOR] * (len(labels) - 2) + [KEPT_COLOR]
            if len(labels) >= 2 else "#546e7a")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    top = max(counts) if len(counts) and max(counts) > 0 else 1
    for yi, c in zip(y, counts):
        ax.text(c + top * 0.01, yi, f"{c:,}", va="center", fontsize=9)
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("clips remaining")
    ax.set_title("funnel (pipeline order)")
    return _png(fig)


def score_histogram(column: str, edges: np.ndarray, kept: np.ndarray, rejected: np.ndarray,
                    thresholds: Sequence[tuple[str, float]]) -> bytes:
    """Stacked histogram of one score, kept vs rejected, with each rule's threshold drawn."""
    fig, ax = plt.subplots(figsize=(6, 2.8))
    # Two filled step outlines (one artist each, however many bins): rejected stacked on kept.
    ax.stairs(kept + rejected, edges, fill=True, color=REJECTED_COLOR, alpha=0.75, label="rejected")
    ax.stairs(kept, edges, fill=True, color=KEPT_COLOR, label="kept")
    for label, value in thresholds:
        ax.axvline(value, color="black", linestyle="--", linewidth=1.2)
        ax.annotate(label, (value, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8)
    ax.set_xlabel(column)
    ax.set_ylabel("clips")
    ax.legend(fontsize=8, loc="upper right")
    return _png(fig)


def overlap_heatmap(labels: Sequence[str], matrix: np.ndarray) -> bytes:
    """Clips rejected by both rules (diagonal: by the rule in total)."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 * n + 2.5, 0.8 * n + 1.5))
    ax.imshow(matrix, cmap="Reds")
    ax.set_xticks(range(n), labels, rotation=35, ha="right")
    ax.set_yticks(range(n), labels)
    top = matrix.max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(matrix[i, j]):,}", ha="center", va="center", fontsize=9,
                    color="white" if top and matrix[i, j] > top / 2 else "black")
    ax.set_title("rejected by both rules")
    return _png(fig)
