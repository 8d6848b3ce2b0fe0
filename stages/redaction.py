"""Credentials never leave the process: every text that goes out (a log line, a traceback,
an error column, run.json, a line on a terminal) passes through `redact` first.

What counts as a credential:
- the values of the credential variables set in this process (`SECRET_ENV`: AWS secret key
  and session token, Azure keys and SAS tokens, a Google access token), as written and
  percent-encoded;
- the user info of any URL (`scheme://user:password@host` -> `scheme://<redacted>@host`),
  and the password of every URL with user info found in the environment (an endpoint
  variable such as AWS_ENDPOINT_URL=http://user:pass@minio:9000), wherever it appears;
- the query string of any URL (a presigned URL's signature).

Where it is applied:
- `RedactingFilter` on every log handler: the message, and the traceback of `exc_info`
  with every exception chained to it (`raise ... from` and the implicit context), and
  `stack_info`; the record's traceback is formatted once, redacted, and left as text;
- `install(process)`: the filter on the root logger's handlers (a handler is added where
  there is none), sys.stdout and sys.stderr wrapped in `RedactingStream` (prints, and the
  lines Ray copies from its workers to the driver's terminal), and the hooks that print
  uncaught exceptions (sys.excepthook, threading.excepthook). The `curate` command calls it
  for its own process; every Ray worker calls it from the worker set-up hook
  (stages/worker.py), since their logs never pass through the driver's handlers;
- `redact_errors(table)`: the error columns of a unit's rows before they are written
  (curation/writer.py), since an error text may come from an exception raised anywhere.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import traceback
import urllib.parse
from typing import Any, TextIO

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET",
              "GOOGLE_OAUTH_ACCESS_TOKEN")
MIN_SECRET_CHARS = 6  # shorter values are too likely to be ordinary words
MASK = "<redacted>"
_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?'\"]*)\?[^\s'\"]*")
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@'\"<>]+@")
_ENV_USERINFO = re.compile(r"://[^\s/:@]*:([^\s/@]+)@")


def secret_values() -> list[str]:
    """The credential values of this process's environment, longest first (a secret that
    contains another is masked whole), each also percent-encoded."""
    found = {os.environ.get(name) or "" for name in SECRET_ENV}
    for value in os.environ.values():
        if "://" in value and "@" in value:
            found.update(m.group(1) for m in _ENV_USERINFO.finditer(value))
    found.update({urllib.parse.unquote(v) for v in found} | {urllib.parse.quote(v, safe="") for v in found})
    return sorted((v for v in found if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)


def redact(text: Any) -> str:
    """`text` without URL query strings, URL user info and this process's credential values."""
    text = _QUERY.sub(r"\1?" + MASK, str(text))
    text = _USERINFO.sub(r"\1" + MASK + "@", text)
    for value in secret_values():
        text = text.replace(value, MASK)
    return text


def format_exception(exc: BaseException) -> str:
    """The traceback of `exc` with its chained exceptions, redacted."""
    return redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n"))


class RedactingFilter(logging.Filter):
    """Redacts a record in place: its message, the traceback of its exception with every
    chained one, and its stack. Handlers share records, so the record leaves this filter
    clean for all of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = format_exception(record.exc_info[1])
            record.exc_info = None  # formatters use exc_text, never the live exception
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class RedactingStream(io.TextIOBase):
    """A text stream that redacts what is written to it before passing it on."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    sys.stderr.write(format_exception(exc.with_traceback(tb)) + "\n")


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        name = args.thread.name if args.thread is not None else "?"
        sys.stderr.write(f"Exception in thread {name}:\n{format_exception(args.exc_value)}\n")


_SAVED: dict[str, Any] = {}


def install(console_level: int | None = logging.WARNING) -> None:
    """Redact everything this process writes (module docstring): the root logger's handlers
    get the filter (with none, one on stderr at `console_level`), stdout and stderr are
    wrapped, and uncaught exceptions are printed redacted. Idempotent; `uninstall` undoes."""
    root = logging.getLogger()
    if not root.handlers and console_level is not None:
        handler = logging.StreamHandler()
        handler.setLevel(console_level)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    if not _SAVED:
        _SAVED.update(stdout=sys.stdout, stderr=sys.stderr, excepthook=sys.excepthook,
                      thread_excepthook=threading.excepthook)
        sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
        for handler in root.handlers:  # handlers made earlier hold the unwrapped stream
            if isinstance(handler, logging.StreamHandler) and handler.stream in (_SAVED["stdout"], _SAVED["stderr"]):
                handler.setStream(RedactingStream(handler.stream))
        sys.excepthook, threading.excepthook = _excepthook, _thread_excepthook


def uninstall() -> None:
    """Undo `install`'s streams and hooks (the filters stay: they only clean)."""
    if not _SAVED:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and isinstance(handler.stream, RedactingStream):
            handler.setStream(handler.stream.stream)
    sys.stdout, sys.stderr = _SAVED["stdout"], _SAVED["stderr"]
    sys.excepthook, threading.excepthook = _SAVED["excepthook"], _SAVED["thread_excepthook"]
    _SAVED.clear()


def redact_errors(table: Any) -> Any:
    """A pyarrow table with every `*_error` string column redacted (only rows with an error
    are touched; a table with none comes back as it is)."""
    import pyarrow as pa

    for i, name in enumerate(table.column_names):
        column = table.column(i)
        if not name.endswith("_error") or not pa.types.is_string(column.type) or column.null_count == len(column):
            continue
        values = column.to_pylist()
        clean = [None if v is None else redact(v) for v in values]
        if clean != values:
            table = table.set_column(i, name, pa.array(clean, pa.string()))
    return table
