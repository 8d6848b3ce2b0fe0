"""What every Ray worker process of a curation run does first (Ray's
`worker_process_setup_hook`, set by curation/pipeline.py's init_ray): the torchvision
compatibility hook (stages/compat.py), and the redaction of everything the worker writes
(stages/redaction.py): its log lines and tracebacks go to Ray's log files and to the
driver's terminal without passing through the driver's handlers."""

from __future__ import annotations

from stages import compat, redaction


def setup() -> None:
    compat.install_import_hook()
    redaction.install()
