"""Writing the page's rules back: a pipeline config with only its filter steps' `rules`
changed, its comments, order and formatting kept (ruamel.yaml's round trip), shown as a diff
before it is written; and applying them to the output as `curate refilter` does.

Where: the config `curate review --config FILE` started from, else OUT_DIR/review/pipeline.yaml
(the run's config, from run.json, with the new rules). A write goes to a temporary file
renamed over the old one, under a lock (in this process, and an flock on a local file for
other processes), so two tabs saving at once leave one whole file, never a mix.
"""

from __future__ import annotations

import difflib
import fcntl
import io
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.util import load_yaml_guess_indent

from curation import outdir
from stages.rules import Rules

_LOCK = threading.Lock()


def _yaml() -> YAML:
    y = YAML()  # round trip: comments, key order, flow style kept
    y.preserve_quotes = True
    y.width = 4096
    return y


def with_rules(text: str, steps: list[tuple[str, Rules]]) -> str:
    """`text` (a pipeline config) with each filter step's rules replaced by `steps`' and
    nothing else changed: a rule already there keeps its place and style (a bound changed in
    place), a new one goes last, one no longer there goes. The document is changed and dumped
    by ruamel.yaml, then only the lines of each `rules:` block are taken from the dump into
    the original text, so a line elsewhere that a dump would reflow stays as written."""
    _, indent, block_seq_indent = load_yaml_guess_indent(text)
    y = _yaml()
    if indent is not None:  # the file's own indentation (lists under their key, or not)
        y.indent(mapping=block_seq_indent or indent, sequence=indent, offset=block_seq_indent or 0)
    data = y.load(text)
    before = _rules_spans(data, len(text.splitlines()))
    wanted = dict(steps)
    for step in data.get("steps") or []:
        if step.get("stage") != "filter" or step.get("name", "filter") not in wanted:
            continue
        if step.get("args") is None:
            step["args"] = CommentedMap()
        rules = step["args"].get("rules")
        if rules is None:
            rules = step["args"]["rules"] = CommentedMap()
        _replace(rules, wanted[step.get("name", "filter")])
    out = io.StringIO()
    y.dump(data, out)
    dumped = out.getvalue().splitlines(keepends=True)
    after = _rules_spans(_yaml().load(out.getvalue()), len(dumped))
    if set(before) != set(after):  # a rules block added where there was none: the whole dump
        return out.getvalue()
    lines = text.splitlines(keepends=True)
    for name in sorted(before, key=lambda n: -before[n][0]):  # bottom up: line numbers stay valid
        (a, b), (c, d) = before[name], after[name]
        lines[a:b] = dumped[c:d]
    return "".join(lines)


def _replace(rules: CommentedMap, new: Rules) -> None:
    for column in [c for c in rules if c not in new]:
        del rules[column]
    for column, bounds in new.items():
        old = rules.get(column)
        if isinstance(old, dict):  # the same mapping, its style kept: bounds changed in place
            for key in [k for k in old if k not in bounds]:
                del old[key]
            for key, value in bounds.items():
                if old.get(key) != value:
                    old[key] = value
        else:
            rules[column] = _flow(bounds)


def _rules_spans(data: Any, n_lines: int) -> dict[str, tuple[int, int]]:
    """{filter step: (first line, line after the last) of its `rules:` block}: from the
    `rules` key to the next key after it (in args, then in the step, then the next step)."""
    spans = {}
    items = data.get("steps") or []
    for i, step in enumerate(items):
        args = step.get("args") if hasattr(step, "get") else None
        if step.get("stage") != "filter" or not isinstance(args, CommentedMap) or "rules" not in args:
            continue
        start = args.lc.key("rules")[0]
        keys, step_keys = list(args), list(step)
        end = None
        if keys.index("rules") + 1 < len(keys):
            end = args.lc.key(keys[keys.index("rules") + 1])[0]
        elif step_keys.index("args") + 1 < len(step_keys):
            end = step.lc.key(step_keys[step_keys.index("args") + 1])[0]
        elif i + 1 < len(items):
            end = items.lc.item(i + 1)[0]
        spans[step.get("name", "filter")] = (start, end if end is not None else n_lines)
    return spans


def _flow(bounds: dict[str, float]) -> CommentedMap:
    m = CommentedMap(bounds)
    m.fa.set_flow_style()
    return m


def config_text(run_config: dict[str, Any]) -> str:
    """The run's config (run.json's) as YAML, for a save without --config."""
    out = io.StringIO()
    _yaml().dump(json.loads(json.dumps(run_config)), out)
    return out.getvalue()


def diff(old: str, new: str, name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        f"{name} (now)", f"{name} (with the page's rules)"))


@contextmanager
def locked(path: Any) -> Iterator[None]:
    """This process's lock, and an flock beside a local file (another process saving)."""
    with _LOCK:
        if not isinstance(path, Path):
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def save(path: Any, base_text: str, steps: list[tuple[str, Rules]], write: bool) -> dict[str, Any]:
    """The diff of `path` (its current text, or `base_text` when it does not exist yet) with
    the rules in; written when `write`, atomically under the lock."""
    with locked(path):
        current = path.read_text() if path.exists() else base_text
        new = with_rules(current, steps)
        if write:
            if isinstance(path, Path):
                tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(new)
                os.replace(tmp, path)
            else:
                outdir.write_bytes_atomic(path, new.encode())
    return {"path": str(path), "diff": diff(current, new, getattr(path, "name", str(path))), "written": write,
            "changed": new != current}


def overrides(before: list[tuple[str, Rules]], after: list[tuple[str, Rules]]) -> list[str]:
    """`curate refilter --set` overrides that turn the rules `before` into `after`."""
    old = dict(before)
    out = []
    for name, rules in after:
        out += [f"{name}.rules.{c}=null" for c in old.get(name, {}) if c not in rules]
        out += [f"{name}.rules.{c}={json.dumps(b)}" for c, b in rules.items()]
    return out
