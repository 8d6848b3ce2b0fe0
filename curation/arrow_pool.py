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

The C heap alone still grew: each checkpoint reads and writes buffers a little larger than
the last (the units' table grows), glibc raises its mmap threshold to the largest block
freed, and such blocks then come from the heap, where the small blocks kept between them
leave holes it never hands back. A probe of 30 checkpoints (60,000 units) went 183 -> 268 MB
with the heap's used bytes flat at 25 MB. So the driver also fixes glibc's mmap threshold
(`fix_mmap_threshold`: a block of 256 KiB or more gets pages of its own, unmapped when
freed), and hands the heap's free pages back after each checkpoint (`give_back`): the same
probe, 169 -> 183 MB.
"""

from __future__ import annotations

import ctypes
import os
import sys

VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"
DRIVER_POOL = "system"
_SET_HERE: list[bool] = []
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 256 * 1024


def is_run_driver(argv: list[str]) -> bool:
    """Whether this process is `curate run` (`curate run ...` or `python -m curation.cli run ...`)."""
    return len(argv) > 1 and argv[1] == "run"


def choose(argv: list[str] | None = None) -> None:
    if not is_run_driver(sys.argv if argv is None else argv):
        return
    fix_mmap_threshold()
    if not os.environ.get(VARIABLE):
        os.environ[VARIABLE] = DRIVER_POOL
        _SET_HERE.append(True)


def fix_mmap_threshold() -> bool:
    """Blocks of MMAP_THRESHOLD bytes or more get pages of their own from now on, returned to
    the system when freed (glibc; a fixed threshold also stops glibc raising it). False where
    the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def give_back() -> None:
    """Hand the free pages of Arrow's pool back to the system (for the C heap, glibc's
    malloc_trim: free pages inside the heap too, not only at its top)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def restore() -> None:
    if _SET_HERE:
        os.environ.pop(VARIABLE, None)
        _SET_HERE.clear()
