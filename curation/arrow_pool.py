"""Arrow's allocator for the driver of `curate run`, chosen before pyarrow loads.

Arrow reads ARROW_DEFAULT_MEMORY_POOL once, when its library loads; `pa.set_memory_pool`
later changes only the pool of pyarrow's own arrays and compute functions, not the one
Arrow's C++ Parquet reader and writer allocate from. With pyarrow's default here (mimalloc),
and with jemalloc too, that pool kept what each of the driver's ledger checkpoints read and
wrote: the driver's RSS rose at every checkpoint (every 2,000 units), 269 MB at 10^4 sources
and 349 MB at 10^5. With the C heap, 292 MB at 10^5 (docs/benchmarks.md, "Corpus scale").

So `curation/__init__.py` calls `choose` before anything imports pyarrow, and `restore`
after: the driver's process gets the C heap, and the processes it starts (Ray's workers
among them) inherit the environment as the user gave it. A pool the user names in
ARROW_DEFAULT_MEMORY_POOL is left as it is. Other commands keep pyarrow's default.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"
DRIVER_POOL = "system"
_SET_HERE: list[bool] = []


def is_run_driver(argv: list[str]) -> bool:
    """Whether this process is `curate run` (`curate run ...` or `python -m curation.cli run ...`)."""
    return len(argv) > 1 and argv[1] == "run"


def choose(argv: list[str] | None = None) -> None:
    if is_run_driver(sys.argv if argv is None else argv) and not os.environ.get(VARIABLE):
        os.environ[VARIABLE] = DRIVER_POOL
        _SET_HERE.append(True)


def restore() -> None:
    if _SET_HERE:
        os.environ.pop(VARIABLE, None)
        _SET_HERE.clear()
