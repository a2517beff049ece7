"""Structured run logs: one JSON object per line in ``CATALOG/_run.log.jsonl`` via :mod:`logging`.

Records are written by the client process only (it sees every finished or failed partition as it
streams results), so the file has a single writer. A resumed run appends to the same file, so the
log is the run's whole history. On object storage there is no append: the lines are kept in memory
and the whole log object is rewritten at most every ``flush_s`` seconds and at the end.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from .. import paths
from ..io.location import Location

LOGGER_NAME = "distlabels.run"


class JsonLinesFormatter(logging.Formatter):
    """``{"time", "level", "event", "message", ...fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        rec: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                               + f".{int(record.msecs):03d}Z",
                               "level": record.levelname.lower(), "event": getattr(record, "event", "message"),
                               "message": record.getMessage()}
        rec.update(getattr(record, "fields", None) or {})
        return json.dumps(rec, default=str)


class ObjectLogHandler(logging.Handler):
    """Keeps the log's lines and rewrites the whole object (object stores cannot append)."""

    def __init__(self, loc: Location, rel: str, flush_s: float = 30.0):
        super().__init__()
        self.loc, self.rel, self.flush_s = loc, rel, flush_s
        try:
            self.lines = loc.read_text(rel).splitlines() if loc.exists(rel) else []
        except OSError:
            self.lines = []
        self._last = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if time.monotonic() - self._last > self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.loc.write_bytes(self.rel, ("\n".join(self.lines) + "\n").encode())
        self._last = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            super().close()


def open_run_log(loc: Location) -> tuple[logging.Logger, logging.Handler]:
    """The run logger with a JSON-lines handler on the catalog's ``_run.log.jsonl`` attached."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    if loc.is_url:
        handler: logging.Handler = ObjectLogHandler(loc, paths.RUN_LOG)
    else:
        handler = logging.FileHandler(loc.path / paths.RUN_LOG, mode="a", encoding="utf-8")
    handler.setFormatter(JsonLinesFormatter())
    logger.addHandler(handler)
    return logger, handler


def close_run_log(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.removeHandler(handler)
    handler.close()


def event(logger: logging.Logger, level: int, name: str, message: str, **fields: Any) -> None:
    logger.log(level, message, extra={"event": name, "fields": fields})


__all__ = ["JsonLinesFormatter", "LOGGER_NAME", "close_run_log", "event", "open_run_log"]
