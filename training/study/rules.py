"""Rules -> keep: the run's rules re-evaluated on the stored scores (leave one out, a percentile sweep)."""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.rules import Rules, evaluate_rows, reason_column, resolve_percentile
from stages.rules import effective_steps as rules_effective_steps
from training.study.corpus import Corpus
from training.study.spec import StudyError


# ---- rules -> keep ----------------------------------------------------------------------

def effective_steps(corpus: Corpus) -> list[tuple[str, Rules]]:
    """The run's rules with percentile rules replaced by their resolved min/max."""
    resolved = {name: r or {} for name, r in (corpus.resolved or {}).items()}
    return [(name, rules) for (name, _), rules in zip(corpus.steps, rules_effective_steps(corpus.steps, resolved))]


def keep_under(corpus: Corpus, steps: list[tuple[str, Rules]]) -> np.ndarray:
    """keep per clip row under (absolute) rules, evaluated as the filter stage does.

    A clip rejected for a reason that is no rule's column (a near-duplicate, say) stays
    rejected under any rules: only rule rejections are re-evaluated.
    """
    columns = {c for _, rules in steps for c in rules}
    keep, _ = evaluate_rows(np.zeros(corpus.clips.num_rows, dtype=bool),
                            {c: corpus.column(c) for c in columns}, [r for _, r in steps])
    return np.asarray(keep, dtype=bool) & ~other_rejections(corpus)


def other_rejections(corpus: Corpus) -> np.ndarray:
    """Clips the stored reject_reasons reject for something other than a rule of the run."""
    ruled = set(ruled_columns(corpus))
    return np.asarray([any(reason_column(r) not in ruled for r in (reasons or []))
                       for reasons in corpus.clips.column("reject_reasons").to_pylist()], dtype=bool)


def without_rule(steps: list[tuple[str, Rules]], column: str) -> list[tuple[str, Rules]]:
    return [(name, {c: b for c, b in rules.items() if c != column}) for name, rules in steps]


def ruled_columns(corpus: Corpus) -> list[str]:
    return list(dict.fromkeys(c for _, rules in corpus.steps for c in rules))


def sweep_side(corpus: Corpus, column: str, side: str) -> str:
    """drop_bottom for a rule with a minimum, drop_top for one with a maximum (or as given)."""
    if side != "auto":
        return side
    for _, rules in corpus.steps:
        b = rules.get(column)
        if b is not None:
            if "min" in b or "drop_bottom" in b:
                return "drop_bottom"
            if "max" in b or "drop_top" in b:
                return "drop_top"
    return "drop_bottom"


def rule_step(corpus: Corpus, column: str) -> str:
    """The filter step that holds a rule on `column` (the first filter step if none does)."""
    for name, rules in corpus.steps:
        if column in rules:
            return name
    if not corpus.steps:
        raise StudyError("the run has no filter step to write a rule into")
    return corpus.steps[0][0]


def with_percentile(corpus: Corpus, column: str, side: str, q: float) -> tuple[list[tuple[str, Rules]], Any]:
    """The rules with `column`'s rule set to drop the `q` share at `side` (q = 0: no rule on it).

    The threshold is resolved over every clip row, as the run's end-of-run pass would resolve
    {side: q} (stages/rules.py), so writing it back gives exactly this arm's rule.
    """
    steps = without_rule(effective_steps(corpus), column)
    if q == 0:
        return steps, None
    resolved = resolve_percentile(corpus.column(column), {side: q})
    bound = {"min": resolved["min"]} if side == "drop_bottom" else {"max": resolved["max"]}
    target = rule_step(corpus, column)
    return [(name, {**rules, column: bound} if name == target else rules) for name, rules in steps], resolved

