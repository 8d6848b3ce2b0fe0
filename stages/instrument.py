"""Event counts for benchmarks and tests: how often something happened in this process.

A stage calls `count("model_load", self.name)` where the event happens; a benchmark or a
test reads `counts("model_load")` before and after and compares. Nothing in a stage reads
a count back, so counting cannot change what a stage computes. Counts are per process: a
Ray actor counts in its own process, so read them where the stages ran (the local runner,
or the actor itself).

Events counted now:
  model_load    key: the stage name; one per model loaded in setup()
  decode_pass   key: the source path; one per decode pass split opens
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

_counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
_lock = threading.Lock()  # the in-process runner's threads count at once


def count(event: str, key: str, n: int = 1) -> None:
    """Record that `event` happened `n` times for `key` (a stage name, a source path)."""
    with _lock:
        _counts[event][key] += n


def counts(event: str) -> Counter[str]:
    """A copy of the counts of `event` so far, by key (empty when it never happened)."""
    with _lock:
        return Counter(_counts.get(event, {}))
