"""`curate run`'s progress: one live bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from curation.runner import Progress
from curation.sources import Source, UnitFeed

REPO = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed_of(n_sources: int) -> tuple[UnitFeed, list]:
    feed = UnitFeed(iter([Source(f"/footage/{i}.mp4", f"id{i}", 1000) for i in range(n_sources)]), 2)
    return feed, list(feed)


def entry(clips: int, kept: int, seconds: dict[str, float]) -> dict:
    return {"clips": clips, "kept": kept, "source_errors": 0, "stage_seconds": seconds}


def test_a_terminal_gets_one_live_bar_with_log_lines_above_it(caplog):
    terminal = Terminal()
    handler = logging.StreamHandler(terminal)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        feed, units = feed_of(4)
        progress = Progress(feed, log_every_s=0, stream=terminal)
        with caplog.at_level(logging.DEBUG):
            progress.unit_done(feed.finished(units[0].unit_id), entry(3, 2, {"split": 1.0, "ocr": 0.5}))
            logging.getLogger("curation.test").warning("a line while the bar is up")
            progress.unit_done(feed.finished(units[1].unit_id), entry(4, 1, {"split": 1.0, "ocr": 3.0}))
        progress.close()
        assert handler.stream is terminal  # given back when the bar closes
    finally:
        root.removeHandler(handler)
    shown = terminal.getvalue()
    # The bar's last state: every count, the busiest step so far, the elapsed time and ETA.
    last = shown.rstrip("\n").split("\r")[-1]
    assert last.startswith("sources 4/4 |") and "clips 7 kept 3" in last and "bottleneck ocr" in last
    assert "ETA" in last
    # The log line was written on a cleared line, with the bar drawn again after it.
    before, after = shown.split("a line while the bar is up\n")
    assert before.endswith("\r") and "bottleneck split" in before and after.startswith("\rsources 2/4")
    # The plain progress lines went to the log at DEBUG only (the bar says it on the terminal).
    plain = [r for r in caplog.records if r.getMessage().startswith("sources ")]
    assert plain and all(r.levelno == logging.DEBUG for r in plain)


def test_without_a_terminal_the_plain_lines_stay(caplog):
    feed, units = feed_of(2)
    progress = Progress(feed, log_every_s=0, stream=io.StringIO())
    assert progress.bar is None
    with caplog.at_level(logging.INFO):
        progress.unit_done(feed.finished(units[0].unit_id), entry(3, 2, {"split": 1.0}))
    assert any(r.levelno == logging.INFO and r.getMessage().startswith("sources 2/2 | clips 3 kept 2")
               for r in caplog.records)


def run_on_a_pty(argv: list[str], timeout_s: float = 300.0) -> str:
    """Run `argv` with stdin/stdout/stderr on a pseudo-terminal 100 columns wide; its output."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, cwd=REPO,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = os.read(main, 65536)
        except OSError:  # the child side closed: the process has ended
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    os.close(main)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_curate_run_on_a_terminal_shows_the_bar(tmp_path):
    """The real command on a pseudo-terminal (stderr behind the redacting wrapper): the bar
    is drawn and ends at every source; through a pipe, the plain lines instead."""
    footage = tmp_path / "footage"
    footage.mkdir()
    for i in range(4):  # not videos: each source is one error row, so the run is quick
        (footage / f"broken{i}.mp4").write_bytes(b"not a video %d" % i)
    argv = [sys.executable, "-m", "curation.cli", "run", str(REPO / "configs" / "spine.yaml"), "--input",
            str(footage), "--output", str(tmp_path / "out"), "--runner", "local", "--set", "run.sources_per_unit=1"]
    shown = run_on_a_pty(argv)
    assert "\rsources 4/4 |" in shown and "bottleneck split" in shown
    assert "| clips 0 kept 0 | source errors 4" not in shown  # the plain line is not on the terminal
    piped = subprocess.run([*argv, "--overwrite"], capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "sources 4/4 | clips 0 kept 0 | source errors 4" in piped.stderr and "\r" not in piped.stderr


END_ON_CLUSTER = """
import sys, time
from curation.cli import setup_logging
from curation.pipeline import init_ray, on_cluster
from curation.runner import compact_at_end
from curation.writer import OutputStore

setup_logging()
out, temp = sys.argv[1], sys.argv[2]
OutputStore(out).prepare("f", overwrite=False)


class Tee:  # what reaches this driver's stderr, Ray's forwarded worker lines included
    def __init__(self, stream):
        self.stream, self.text = stream, ""

    def write(self, text):
        self.text += text
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return False

    def fileno(self):
        return self.stream.fileno()


sys.stderr = tee = Tee(sys.stderr)
init_ray(None, num_cpus=1, object_store_mb=80, temp_dir=temp)
on_cluster(compact_at_end, out)
deadline = time.monotonic() + 60  # Ray forwards a worker's lines within a second or two
while "checkpoint 1 holds 0 units" not in tee.text and time.monotonic() < deadline:
    time.sleep(0.2)
import ray
ray.shutdown()
print("SEEN" if "checkpoint 1 holds 0 units" in tee.text else "NOT SEEN", flush=True)
"""


def test_the_end_of_a_run_on_the_cluster_shows_its_progress_on_the_drivers_terminal(tmp_path, ray_tmp):
    """The end-of-run compaction runs as a task on the Ray cluster. A worker logs warnings
    only, so its progress lines were lost and the run went quiet for minutes at 10^5
    sources; the task now writes its `curation` INFO lines to stderr, which Ray forwards to
    the driver's terminal."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", END_ON_CLUSTER, str(tmp_path / "out"), ray_tmp],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "SEEN", done.stderr[-3000:]
    assert "compact at end on the cluster" in done.stderr
    assert (tmp_path / "out" / "ledger" / "checkpoint-00000001.json").exists()
