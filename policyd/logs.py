"""Logging: one line per record in logfmt or JSON, written by a thread, never by the event loop.

Records go onto a bounded in-memory queue and a listener thread formats and writes them to
stderr, so a slow terminal or log collector can never stall the policy server. If the queue is
full the record is dropped and counted rather than waited for.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

from policyd.codec import PolicyRequest
from policyd.engine import Decision

LOG_QUEUE_SIZE = 10_000  # records waiting to be written before new ones are dropped

decision_log = logging.getLogger("policyd.decision")


class Formatter(logging.Formatter):
    """``time=... level=... logger=... msg=...`` (logfmt) or the same keys as a JSON object.

    A record may carry ``fields`` (a dict, passed with ``extra=``) that become keys of their own.
    """

    def __init__(self, style: str) -> None:
        super().__init__()
        self.json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["error"] = record.exc_text
        if self.json:
            return json.dumps(fields)
        return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items())


def logfmt_value(value: object) -> str:
    """A logfmt value: bare if it is plain, else quoted with escapes; never spans lines."""
    text = str(value)
    if text and all(ch.isprintable() and ch not in ' "=\\' for ch in text):
        return text
    escaped = json.dumps(text)  # quotes, backslashes, control characters and surrogates escaped
    return escaped


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread without formatting them, and never blocks."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Formatting happens in the writer thread. Only an exception is rendered here, while
        # its traceback still exists.
        record = copy.copy(record)
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class Logging:
    """The process's logging: set up once by the CLI, stopped (and flushed) at exit."""

    def __init__(self, level: str, style: str) -> None:
        records: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE_SIZE)
        self.handler = _QueueHandler(records)
        writer = logging.StreamHandler(sys.stderr)
        writer.setFormatter(Formatter(style))
        self.listener = logging.handlers.QueueListener(records, writer)
        root = logging.getLogger()
        self._previous = (root.handlers, root.level)
        root.handlers = [self.handler]
        root.setLevel(level.upper())
        self.listener.start()

    def stop(self) -> None:
        """Write what is still queued, then give the root logger back its old handlers."""
        self.listener.stop()
        root = logging.getLogger()
        root.handlers, level = self._previous
        root.setLevel(level)


def log_decision(request: PolicyRequest, decision: Decision) -> None:
    """The decision log line: who, what, the verdict and the rule; never the whole request."""
    decision_log.info(
        "decision",
        extra={
            "fields": {
                "verdict": decision.verdict.value,
                "reason": decision.reason,
                "login": request.sasl_username,
                "sender": request.sender,
                "action": decision.action,
                "rule": str(decision.rule) if decision.rule else "-",
                "instance": request.instance or "-",
                "queue_id": request.queue_id or "-",
            }
        },
    )
