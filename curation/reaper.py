"""Ends what a killed `curate run` leaves behind: `python -m curation.reaper DRIVER_PID`.

An embedded Ray cluster is a tree of processes under the driver (GCS, raylet, workers,
dashboard and runtime-env agents). When the driver is SIGKILLed, Ray takes most of them
down, but some agents are left orphaned and alive. The CLI starts this watcher in a session
of its own (so a signal to the driver's process group does not end it first): while the
driver lives it notes the driver's descendants once a second; once the driver is gone it
sends SIGTERM, then SIGKILL, to each noted process that is still the same process (same
start time). It exits when they are all gone. It never touches a process it did not see
descend from the driver.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

POLL_S = 1.0
TERM_GRACE_S = 3.0


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (None when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below root."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        st = start_time(pid)
        if st is not None:
            found[pid] = st
            todo.extend(children.get(pid, []))
    return found


def alive(noted: dict[int, int]) -> dict[int, int]:
    return {pid: st for pid, st in noted.items() if start_time(pid) == st}


def watch(driver: int) -> None:
    driver_start = start_time(driver)
    noted: dict[int, int] = {}
    while driver_start is not None and start_time(driver) == driver_start:
        noted.update(descendants(driver))
        noted.pop(os.getpid(), None)  # this watcher is the driver's child too
        noted = alive(noted)
        time.sleep(POLL_S)
    for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, TERM_GRACE_S)):
        left = alive(noted)
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while alive(noted) and time.monotonic() < deadline:
            time.sleep(0.1)


def spawn(driver: int) -> None:
    """Start the watcher for `driver` in a session of its own (Linux only; a no-op elsewhere)."""
    import subprocess

    if not Path("/proc/self/stat").exists():
        return
    subprocess.Popen([sys.executable, "-m", "curation.reaper", str(driver)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
