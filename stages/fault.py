"""fault: deliberate failures on chosen sources, to prove that a run contains them.

For containment tests and the soak benchmark (bench/soak_bench.py), never for curation: on
a row whose source_path contains one of the `faults` keys, this stage fails the way real
sources fail their workers, then (if it returns at all) passes the batch on unchanged:
  kill      SIGKILL to its own process (what the OOM killer sends)
  exit      os._exit(1) (a library that calls exit)
  segfault  a read of address 0 (a native crash)
  hang      sleep forever (a decode that never returns)
  raise     a Python exception (a bug in a stage)
  leak      a library that puts its configuration in an error: an exception whose text holds
            the store's endpoint URL and secret key (from the environment) is logged with its
            traceback, then raised as the cause of one that quotes it (the redaction test's way in)
  hold      hang, but only in a process whose environment sets CURATE_FAULT_HOLD (one node of a
            test cluster, started with it in its env_vars, which its workers inherit); elsewhere
            the row passes untouched (a test removes that node while it is surely busy)
Rows of other sources pass through untouched. It declares `fault_error`, which it leaves
null: the runner fills it where the stage's worker died or timed out (a private column, not
part of the written contract).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from typing import Literal

from stages.base import Batch, Stage

FaultMode = Literal["kill", "exit", "segfault", "hang", "raise", "hold", "leak"]
MODES = ("kill", "exit", "segfault", "hang", "raise", "hold", "leak")
log = logging.getLogger(__name__)
HOLD_ENV = "CURATE_FAULT_HOLD"  # set (non-empty) where mode `hold` hangs


def fail(mode: str) -> None:
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "exit":
        os._exit(1)
    elif mode == "segfault":
        ctypes.string_at(0)
    elif mode == "hang":
        while True:
            time.sleep(3600)
    elif mode == "raise":
        raise RuntimeError("fault stage: raised on purpose")
    elif mode == "leak":
        try:
            raise ConnectionError(f"cannot reach {os.environ.get('AWS_ENDPOINT_URL')} as "
                                  f"{os.environ.get('AWS_ACCESS_KEY_ID')}:{os.environ.get('AWS_SECRET_ACCESS_KEY')}")
        except ConnectionError as exc:
            log.warning("fault stage: the store client failed", exc_info=exc)
            raise RuntimeError(f"fault stage: leaked on purpose ({exc})") from exc
    elif mode == "hold" and os.environ.get(HOLD_ENV):
        fail("hang")


class FaultStage(Stage):
    """Fail on purpose on sources whose path contains a key of `faults` (module docstring)."""

    name = "fault"
    outputs = ("fault_error",)

    def __init__(self, faults: dict[str, FaultMode] | None = None):
        faults = dict(faults or {})
        for key, mode in faults.items():
            if mode not in MODES:
                raise ValueError(f"faults[{key!r}]={mode!r}; allowed: {', '.join(MODES)}")
            if not key:
                raise ValueError("faults: an empty key would match every source")
        self.faults = faults

    def __call__(self, batch: Batch) -> Batch:
        for path in batch.get("source_path", []):
            for key, mode in self.faults.items():
                if key in path:
                    fail(mode)
        return {**batch, "fault_error": [None] * len(batch.get("source_path", []))}
