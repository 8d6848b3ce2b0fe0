"""The page of a proxy-model study: OUT_DIR/study/<name>/index.html and plots/*.png.

Built from results.json and study.json (training/study/ writes both) and, for the training
curves, the runs' metrics.csv files, so it can be rebuilt without training:
`write_page(root, record, results)`. One self-contained file, in the main report's style
(curation/templates/style.css, and its tables by the templates' table macro): plots inline as
data: URLs, no script. (The page itself is still put together here, not by a template.)
"""

from __future__ import annotations

import base64
import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from markupsafe import Markup, escape

from curation import templates
from curation.report.plots import _png, plt
from stages.rules import fmt

CSS = (templates.HERE / "style.css").read_text()
RawHtml = Markup  # already-escaped markup for a table cell


def e(value: Any) -> str:
    return str(escape(str(value)))


def _table(header: list[str], rows: list[list[Any]], left: int | set[int] = 1) -> str:
    """The templates' table macro (curation/templates/macros.html)."""
    macro = templates.environment().get_template("macros.html").module.table
    return str(macro(header, rows, left=sorted(left) if isinstance(left, set) else left))

ARM_COLORS = {"curated": "#2e7d32", "uncurated": "#c62828", "curated_no_image_pretraining": "#6a1b9a"}
OTHER_COLOR = "#546e7a"
PALETTE = ["#1f77b4", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79"]


def _color(arm: str, others: list[str] | None = None) -> str:
    """The key arms' fixed colours; the others by their place in `others` (grey without it)."""
    if arm in ARM_COLORS:
        return ARM_COLORS[arm]
    if others and arm in others:
        return PALETTE[others.index(arm) % len(PALETTE)]
    return OTHER_COLOR


def arm_order(results: dict[str, Any], s: dict[str, Any], distinct: bool = False) -> list[str]:
    """The arms of an eval set in plan order (results.json's dicts come back key-sorted);
    distinct: without the arms that took another arm's numbers."""
    return [a["name"] for a in results["arms"] if a["name"] in s["arms"] and not (distinct and a["same_as"])]


def arms_plot(set_name: str, s: dict[str, Any], names: list[str]) -> bytes:
    """Each arm's held-out loss with its 95% interval (and the per-seed values as dots)."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    for y, arm in enumerate(names):
        a = s["arms"][arm]
        ax.errorbar(a["mean"], y, xerr=[[a["mean"] - a["ci95"][0]], [a["ci95"][1] - a["mean"]]], fmt="o",
                    color=_color(arm), capsize=4)
        ax.scatter(a["per_seed"], [y + 0.18] * len(a["per_seed"]), s=10, color=_color(arm), alpha=0.5)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("held-out EDM loss (grid average; lower is better)")
    ax.set_title(f"{set_name}: mean and 95% interval (dots: seeds)")
    return _png(fig)


def differences_plot(set_name: str, s: dict[str, Any]) -> bytes:
    cmps = s["comparisons"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(1, len(cmps)) + 1.2))
    for y, c in enumerate(cmps):
        ax.errorbar(c["difference"], y, xerr=[[c["difference"] - c["ci95"][0]], [c["ci95"][1] - c["difference"]]],
                    fmt="s", color="#37474f", capsize=4)
    ax.axvline(0, color="black", linewidth=1, linestyle="--")
    ax.set_yticks(range(len(cmps)), [c["label"] for c in cmps])
    ax.invert_yaxis()
    ax.set_xlabel("difference in held-out loss (< 0: the first arm is better)")
    ax.set_title(f"{set_name}: paired differences, 95% interval")
    return _png(fig)


def sigma_plot(set_name: str, s: dict[str, Any], sigmas: list[float], names: list[str]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3))
    others = [a for a in names if a not in ARM_COLORS]
    for arm in names:
        a = s["arms"][arm]
        ax.plot(sigmas, a["per_sigma"], marker="o", markersize=3, label=arm, color=_color(arm, others))
    ax.set_xscale("log")
    ax.set_xlabel("noise level sigma (the fixed grid)")
    ax.set_ylabel("EDM loss")
    ax.set_title(f"{set_name}: loss per noise level (mean over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def sweep_plot(sweep: dict[str, Any]) -> bytes:
    rows = sorted(sweep["settings"], key=lambda r: r["percentile"])
    x = [100 * r["percentile"] for r in rows]
    m = np.array([r["mean"] for r in rows])
    lo = np.array([r["ci95"][0] for r in rows])
    hi = np.array([r["ci95"][1] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.errorbar(x, m, yerr=[m - lo, hi - m], fmt="-o", color="#37474f", capsize=4)
    best = sweep["best"]
    ax.scatter([100 * best["percentile"]], [next(r["mean"] for r in rows if r["arm"] == best["arm"])],
               s=120, facecolors="none", edgecolors="#2e7d32", linewidths=2, label="lowest loss", zorder=3)
    labels = [f"{xi:g}%\n" + ("no rule" if r["threshold"] is None else fmt(round(r["threshold"], 4)))
              + f"\n{r['clips']} clips" for xi, r in zip(x, rows)]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_xlabel(f"{sweep['column']}: share dropped ({sweep['side']}), threshold, training clips")
    ax.set_ylabel(f"{sweep['metric']} loss")
    ax.set_title(f"threshold sweep on {sweep['column']} (95% intervals)")
    ax.legend(fontsize=8)
    return _png(fig)


def curves_plot(root: Path, results: dict[str, Any]) -> bytes | None:
    """Training loss of each arm's last stage (mean over seeds, smoothed)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    drawn = False
    by_arm: dict[str, list[list[float]]] = {}
    for r in results["runs"]:
        last = list(r["stages"])[-1]
        path = root / "runs" / r["arm"] / f"seed{r['seed']}" / last / "metrics.csv"
        if not path.exists():
            continue
        with open(path) as f:
            by_arm.setdefault(f"{r['arm']} ({last})", []).append([float(row["loss"]) for row in csv.DictReader(f)])
    others = [label.split(" (")[0] for label in by_arm if label.split(" (")[0] not in ARM_COLORS]
    for label, curves in by_arm.items():
        n = min(len(c) for c in curves)
        if n < 2:
            continue
        mean = np.mean([c[:n] for c in curves], 0)
        k = max(1, n // 10)
        smooth = np.convolve(mean, np.ones(k) / k, mode="valid")
        arm = label.split(" (")[0]
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=label, color=_color(arm, others))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (running mean)")
    ax.set_title("training loss, last stage, mean over seeds")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _ci(a: dict[str, Any], signed: bool = False) -> str:
    f = "{:+.4f}" if signed else "{:.4f}"
    return f"[{f.format(a['ci95'][0])}, {f.format(a['ci95'][1])}]"


def _head(record: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """The page's head, title, what was compared and how, and the held-out sources."""
    spec = results["spec"]
    split = results["split"]
    return [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'><link rel='icon' href='data:,'>",
        f"<title>curation study {e(results['study'])}</title><style>{CSS}</style></head><body>",
        f"<h1>Does curation help? Study <code>{e(results['study'])}</code></h1>",
        f"<div class='muted'>{e(results['out_dir'])} &middot; preset {e(spec['preset_size'])}, stages "
        f"{e(' → '.join(spec['stages']))}, seeds {e(', '.join(map(str, spec['seeds'])))} &middot; "
        f"{e(record.get('created_at', ''))} &middot; <a href='results.json'>results.json</a> &middot; "
        f"<a href='study.json'>study.json</a> (every arm's clips, configs and seeds)</div>",
        "<p>Small proxy models trained on matched subsets of one curated output, compared by their "
        "EDM denoising loss on clips from held-out <b>sources</b> (no arm trained on them), at a fixed "
        f"grid of {len(results['eval']['sigmas'])} noise levels with fixed noise. Lower is better. "
        "Intervals are 95% percentile bootstraps; a difference is bootstrapped paired. "
        "The numbers are whatever came out: at this size they say more about the method than about "
        "curation.</p>",
        f"<p>{split['train_sources']} training sources, {split['heldout_sources']} held out: "
        + e(", ".join(os.path.basename(p or s) for s, p in split["heldout_source_paths"].items())) + "</p>",
    ]


def _arms_section(results: dict[str, Any]) -> list[str]:
    """The table of arms (training clips, stages, clip and frame counts), and how the uncurated arm was drawn."""
    rows = []
    for a in results["arms"]:
        m = a["meta"]
        counts = sorted(set(a["clips_per_seed"].values()))
        per_seed = m.get("frames_per_seed")
        frames = "/".join(map(str, sorted(set(per_seed.values())))) if per_seed else m.get("frames", "")
        rows.append([a["name"], a["description"], " → ".join(a["stages"]),
                     "/".join(map(str, counts)), frames,
                     a["same_as"] and f"same clips as {a['same_as']}: its numbers" or ""])
    parts = ["<h2 id='arms'>Arms</h2>",
             _table(["arm", "training clips", "stages", "clips", "frames", "note"], rows, left={0, 1, 2, 5})]
    unc = {a["name"]: a for a in results["arms"]}.get("uncurated")
    if unc:
        fps = unc["meta"].get("frames_per_seed", {})
        shares = unc["meta"].get("kept_share_per_seed", {})
        parts.append(f"<p class='muted'>uncurated: drawn from {unc['meta'].get('pool_clips')} decodable clips "
                     f"({unc['meta'].get('pool_frames')} frames); frames per seed "
                     + e(", ".join(f"{s}: {v}" for s, v in fps.items()))
                     + "; share of the draw the rules keep "
                     + e(", ".join(f"{s}: {v:.0%}" for s, v in shares.items())) + ".</p>")
    return parts


def _eval_set_section(set_name: str, s: dict[str, Any], results: dict[str, Any],
                      images: dict[str, str]) -> list[str]:
    """One eval set: each arm's loss and interval, the paired differences, and the set's plots."""
    parts = [f"<h2 id='{e(set_name)}'>{e(set_name)}</h2>",
             f"<p>{s['clips']} clips from {s['sources']} held-out sources, {s['samples']} samples "
             f"({results['spec']['eval_windows']} frame windows per clip); intervals cover "
             f"{e(s['interval_covers'])} ({s['units']} bootstrap units).</p>"]
    arm_rows = [[arm, a["mean"], RawHtml(e(_ci(a))), RawHtml(e(", ".join(f"{v:.4f}" for v in a["per_seed"])))]
                for arm, a in ((n, s["arms"][n]) for n in arm_order(results, s))]
    parts += [f"<p class='bad'>{e(n)}</p>" for n in s.get("notes", [])]
    parts.append(_table(["arm", "mean loss", "95% interval", "per seed"], arm_rows, left={0, 3}))
    parts.append("<p class='muted'>Every arm is scored on the same held-out samples and noise, so most of "
                 "an arm's interval is the spread of those samples, shared by all arms: compare arms by the "
                 "paired differences below, not by overlapping intervals.</p>")
    cmp_rows = [[c["label"], RawHtml(f"{c['difference']:+.4f}"), RawHtml(e(_ci(c, True))),
                 f"{100 * c['share_a_lower']:.0f}%", c["verdict"]] for c in s["comparisons"]]
    if cmp_rows:
        parts.append(_table(["difference", "value", "95% interval", "bootstrap draws with a < b", "reading"],
                            cmp_rows, left={0, 4}))
    parts.append("<div class='plots'>" + "".join(
        f"<img src='{images[k]}' alt='{e(k)}'>" for k in (f"arms_{set_name}", f"differences_{set_name}",
                                                           f"sigma_{set_name}") if k in images) + "</div>")
    return parts


def _sweep_section(results: dict[str, Any], images: dict[str, str]) -> list[str]:
    """The threshold sweep: the lowest-loss setting, how to write it back, every setting's loss."""
    sw = results["sweep"]
    b = sw["best"]
    parts = ["<h2 id='sweep'>Threshold sweep</h2>",
             f"<p>One proxy per setting of the <b>{e(sw['column'])}</b> rule ({e(sw['side'])}; the "
             f"other rules as the run has them), judged on {e(sw['metric'])}. Lowest loss: "
             f"{e(sw['side'])} {b['percentile']:g}"
             + (f" (threshold {e(fmt(b['threshold']))})" if b["threshold"] is not None else " (no rule)")
             + f". Write it back as the rule with <code>{e(b['refilter'])}</code> (or "
             f"<code>curate ablate {e(results['out_dir'])} --name {e(results['study'])} --write-back</code>). "
             "Check the intervals first: overlapping ones do not pick a winner.</p>"]
    rows = [[f"{r['percentile']:g}", "no rule" if r["threshold"] is None else fmt(r["threshold"]), r["clips"],
             r["mean"], RawHtml(e(_ci(r)))] for r in sorted(sw["settings"], key=lambda r: r["percentile"])]
    parts.append(_table(["share dropped", "threshold", "training clips", "mean loss", "95% interval"], rows,
                        left=0))
    if "sweep" in images:
        parts.append(f"<div class='plots'><img src='{images['sweep']}' alt='sweep'></div>")
    return parts


def _runs_section(record: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """Every run's time per stage, how to rerun the study, the library versions; closes the page."""
    runs = [[r["arm"], r["seed"], f"{r['seconds']:.0f}",
             ", ".join(f"{k} {v['steps']} steps {v['seconds']:.0f}s" for k, v in r["stages"].items())]
            for r in results["runs"]]
    return ["<h2 id='runs'>Runs</h2>", _table(["arm", "seed", "seconds", "stages"], runs, left={0, 3}),
            "<h2 id='rerun'>Rerun</h2><p>Every arm's clip ids, each run's resolved trainer configs and "
            "seeds, the split, the noise grid and the library versions are in <code>study.json</code>. "
            f"<code>curate ablate {e(results['out_dir'])} --rerun {e(record['root'])}/study.json --name NEW</code> "
            "trains the same runs again from that file (same machine and versions: the same numbers, on CPU).</p>",
            f"<p class='muted'>versions: {e(results['versions'])}</p></body></html>"]


def render(record: dict[str, Any], results: dict[str, Any], images: dict[str, str]) -> str:
    """The study's page: head, arms, one section per eval set, the sweep, training curves, runs."""
    parts = _head(record, results) + _arms_section(results)
    for set_name, s in results["eval_sets"].items():
        parts += _eval_set_section(set_name, s, results, images)
    if "sweep" in results:
        parts += _sweep_section(results, images)
    if "curves" in images:
        parts.append("<h2 id='training'>Training</h2>"
                     f"<div class='plots'><img src='{images['curves']}' alt='curves'></div>")
    parts += _runs_section(record, results)
    return "\n".join(parts)


def write_page(root: Path, record: dict[str, Any], results: dict[str, Any]) -> Path:
    """Write plots/*.png and index.html under root; returns the page's path."""
    plots = root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    pngs: dict[str, bytes] = {}
    for set_name, s in results["eval_sets"].items():
        pngs[f"arms_{set_name}"] = arms_plot(set_name, s, arm_order(results, s, distinct=True))
        if s["comparisons"]:
            pngs[f"differences_{set_name}"] = differences_plot(set_name, s)
        pngs[f"sigma_{set_name}"] = sigma_plot(set_name, s, results["eval"]["sigmas"], arm_order(results, s, True))
    if "sweep" in results:
        pngs["sweep"] = sweep_plot(results["sweep"])
    curves = curves_plot(root, results)
    if curves:
        pngs["curves"] = curves
    images = {}
    for key, data in pngs.items():
        (plots / f"{key}.png").write_bytes(data)
        images[key] = "data:image/png;base64," + base64.b64encode(data).decode()
    page = root / "index.html"
    page.write_text(render(record, results, images))
    return page
