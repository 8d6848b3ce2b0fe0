"""The README and docs/ against the code: links resolve, the commands they name exist, and the
config reference in docs/user-guide.md lists exactly the keys the config dataclasses accept.

Offline and fast: the files are read as text, the `curate` parser is built in-process
(curation/cli.py's build_parser), and the config keys come from curation/config.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def _split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines): fenced blocks and 4-space indented lines are code."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or line.startswith("    ") or line.startswith("\t"):
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = _split_code(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    prose, _ = _split_code(path.read_text())
    text = "\n".join(CODE_SPAN.sub("", line) for line in prose)
    return LINK.findall(text)


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with the anchor #{anchor} in {dest.relative_to(REPO)}")
    return bad


def test_docs_exist():
    names = {p.relative_to(REPO).as_posix() for p in DOCS}
    for name in ("README.md", "docs/user-guide.md", "docs/storage-and-clusters.md", "docs/trainer.md",
                 "docs/design.md", "docs/benchmarks.md"):
        assert name in names, f"{name} is missing"
    assert (REPO / "docs" / "images" / "report.png").stat().st_size < 400_000


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path):
    found = links(path)
    bad = broken_links(path)
    assert not bad, f"{path.relative_to(REPO)}: broken links:\n" + "\n".join(bad)
    if path.name == "README.md":
        assert found, "README.md links to nothing"


def test_github_slugs():
    assert github_slug("Footage in object storage (s3://, gs://, az://)") == "footage-in-object-storage-s3-gs-az"
    assert github_slug("OUT_DIR in object storage: no shared filesystem needed") == \
        "out_dir-in-object-storage-no-shared-filesystem-needed"
    assert github_slug("Does curation help? `curate ablate` (proxy-model studies)") == \
        "does-curation-help-curate-ablate-proxy-model-studies"


# ---- the `curate` subcommands named in the docs ---------------------------------------------

def curate_subcommands() -> set[str]:
    from curation.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("curation/cli.py's build_parser has no subcommands")


def named_subcommands(path: Path) -> set[str]:
    """The word after `curate` in inline code and in code lines (comments left out)."""
    prose, code = _split_code(path.read_text())
    snippets = [span for line in prose for span in CODE_SPAN.findall(line)]
    snippets += [re.split(r"\s#\s|^\s*#", line)[0] for line in code]
    names = set()
    for snippet in snippets:
        for m in re.finditer(r"(?:^|[\s;&|(])(?:[\w.$()/-]*/)?curate ([a-z][\w-]*)", snippet):
            names.add(m.group(1))
    return names


def test_named_subcommands_exist():
    known = curate_subcommands()
    assert {"run", "report", "refilter", "dedup", "export", "train", "ablate"} <= known
    unknown = {}
    for path in DOCS:
        bad = named_subcommands(path) - known
        if bad:
            unknown[path.relative_to(REPO).as_posix()] = sorted(bad)
    assert not unknown, f"`curate` subcommands that curation/cli.py does not define: {unknown}"
    everywhere = set().union(*(named_subcommands(p) for p in DOCS))
    assert known <= everywhere, f"subcommands no page names: {sorted(known - everywhere)}"


# ---- the config reference --------------------------------------------------------------------

def config_reference() -> dict[str, list[str]]:
    """{section: [keys]} from docs/user-guide.md's "Config reference": a `### ` heading whose
    first code span names the section, then a table whose first column is `key`."""
    text = (REPO / "docs" / "user-guide.md").read_text()
    m = re.search(r"^## Config reference\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "docs/user-guide.md has no '## Config reference' section"
    sections: dict[str, list[str]] = {}
    current = None
    for line in m.group(1).splitlines():
        if line.startswith("### "):
            span = CODE_SPAN.search(line)
            assert span, f"config reference heading without a `section`: {line!r}"
            current = span.group(1)
            assert current not in sections, f"config reference: {current} twice"
            sections[current] = []
        elif line.startswith("| `") and current is not None:
            key = CODE_SPAN.search(line.split("|")[1])
            sections[current].append(key.group(1))
    return sections


def config_keys() -> dict[str, set[str]]:
    """{section: keys} the config loader accepts (curation/config.py)."""
    from curation.config import DedupOptions, PipelineConfig, RayOptions, RunOptions, Step, stage_parameters
    from stages import STAGES

    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    keys = {"pipeline.yaml": names(PipelineConfig), "steps[]": names(Step), "ray": names(RayOptions),
            "run": names(RunOptions), "dedup": names(DedupOptions)}
    for stage, cls in STAGES.items():
        keys[stage] = set(stage_parameters(cls))
    return keys


def test_config_reference_matches_config():
    documented = config_reference()
    expected = config_keys()
    assert set(documented) == set(expected), (
        f"config reference sections: missing {sorted(set(expected) - set(documented))}, "
        f"unknown {sorted(set(documented) - set(expected))}")
    problems = []
    for section, keys in expected.items():
        doc = documented[section]
        if len(doc) != len(set(doc)):
            problems.append(f"{section}: a key is listed twice")
        if missing := keys - set(doc):
            problems.append(f"{section}: not documented: {sorted(missing)}")
        if extra := set(doc) - keys:
            problems.append(f"{section}: documented but not in the config: {sorted(extra)}")
    assert not problems, "docs/user-guide.md's config reference:\n" + "\n".join(problems)
