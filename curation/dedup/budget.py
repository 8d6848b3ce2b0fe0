"""What one dedup pass may hold at once (`Budget`, from the dedup.memory_mb setting) and how it
logs a long phase's progress (`Progress`)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("curation.dedup")

PROGRESS_EVERY_S = 10.0
FAULT_AROUND_BYTES = 68 * 1024  # mapped per page fault of a file mapping: 64 kB around it, and its page
DEFAULT_MEMORY_MB = 256
MIN_MEMORY_MB = 16


class Progress:
    """Logs a long phase's progress at most every PROGRESS_EVERY_S (and when told to)."""

    def __init__(self, what: str):
        self.what = what
        self.started = self.last = time.monotonic()

    def __call__(self, fmt: str, *args: Any, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info("dedup: %s: " + fmt + ", %.0fs", self.what, *args, now - self.started)

    def seconds(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True)
class Budget:
    """What memory_mb allows at once: a partition read back with what sorting it takes (a
    quarter: callers size partitions at four times their records' bytes), buffered partition
    writes (an eighth, shared by the few partitioned spills open at once: a thirty-second each),
    the pages of one mapped read or write (an eighth) and a streamed block (a sixteenth)."""

    memory_mb: float = DEFAULT_MEMORY_MB  # tests take fractions of a MB, to have many partitions

    @property
    def part_bytes(self) -> int:
        return max(1, int(self.memory_mb * 2**20 / 4))

    @property
    def buffer_bytes(self) -> int:
        return max(1, int(self.memory_mb * 2**20 / 32))

    def parts(self, total_bytes: float) -> int:
        """Partitions for records of about `total_bytes` in all."""
        return max(1, math.ceil(total_bytes / self.part_bytes))

    def block_rows(self, bytes_per_row: int) -> int:
        """Rows per streamed block when each costs `bytes_per_row` while processed (a sixteenth)."""
        return max(256, int(self.memory_mb * 2**20 / 16 / max(1, bytes_per_row)))

    def map_rows(self, itemsize: int) -> int:
        """Rows per mapping: a row read through a mapping brings the pages around it too (Linux
        maps up to fault_around_bytes, 64 kB, per fault: 7,600 scattered rows of a 2M-row file
        held 546 MB while mapped)."""
        return max(16, int(self.memory_mb * 2**20 / 8 / (FAULT_AROUND_BYTES + itemsize)))
