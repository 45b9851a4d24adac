"""Logging: one line per record in logfmt or JSON, written by a thread, never by the event loop.

Records go onto a bounded in-memory queue and a listener thread formats and writes them to
stderr, so a slow terminal or log collector can never stall the policy server. If the queue is
full the record is dropped and counted rather than waited for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import re
import sys
import threading
import time
from typing import Any

from policyd.codec import PolicyRequest
from policyd.engine import Decision

LOG_QUEUE_SIZE = 10_000  # records waiting to be written before new ones are dropped
LOG_BATCH = 256  # lines written together
LOG_FLUSH_SECONDS = 0.05  # decision lines wait at most this long to be handed to the writer
LOG_FLUSH_TIMEOUT = 2.0  # at exit, the writer gets this long to write what is still queued

DECISION_LOGGER = "policyd.decision"
decision_log = logging.getLogger(DECISION_LOGGER)


class Formatter(logging.Formatter):
    """``time=... level=... logger=... msg=...`` (logfmt) or the same keys as a JSON object.

    A record may carry ``fields`` (a dict, passed with ``extra=``) that become keys of their own.
    """

    def __init__(self, style: str) -> None:
        super().__init__()
        self.json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"msg": record.getMessage()}
        fields.update(getattr(record, "fields", {}))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["error"] = record.exc_text
        return self.render(record.created, record.levelname.lower(), record.name, fields)

    def render(self, created: float, level: str, logger: str, fields: dict[str, Any]) -> str:
        line: dict[str, Any] = {"time": self.stamp(created), "level": level, "logger": logger}
        line.update(fields)
        if self.json:
            return json.dumps(line)
        return " ".join([f"{key}={logfmt_value(value)}" for key, value in line.items()])

    def stamp(self, created: float) -> str:
        milliseconds = int(created * 1000) % 1000
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{milliseconds:03d}Z"

    def decision(self, created: float, request: PolicyRequest, decision: Decision) -> str:
        """render() of a decision line, spelt out: it is written for every refusal."""
        if self.json:
            fields = {"msg": "decision", **decision_fields(request, decision)}
            return self.render(created, "info", DECISION_LOGGER, fields)
        rule = str(decision.rule) if decision.rule else "-"
        return (
            f"time={self.stamp(created)} level=info logger={DECISION_LOGGER} msg=decision"
            f" verdict={decision.verdict.value} reason={decision.reason}"
            f" login={logfmt_value(_clip(request.sasl_username))}"
            f" sender={logfmt_value(_clip(request.sender))}"
            f" action={logfmt_value(_clip(decision.action))} rule={logfmt_value(rule)}"
            f" instance={logfmt_value(_clip(request.instance) or '-')}"
            f" queue_id={logfmt_value(_clip(request.queue_id) or '-')}"
        )


_PLAIN = re.compile(r'[^\s"=\\]+')


def logfmt_value(value: object) -> str:
    """A logfmt value: bare if it is plain, else quoted with escapes; never spans lines."""
    text = value if isinstance(value, str) else str(value)
    if text and text.isprintable():
        plain = '"' not in text and "\\" not in text
        if plain and " " not in text and "=" not in text:
            return text
        if plain:
            return f'"{text}"'
    return json.dumps(text)  # quotes, backslashes, control characters and surrogates escaped


# What the writer thread takes from the queue: a log record to format, a line already
# formatted (decisions: formatting them here is cheaper than making the event loop and this
# thread take turns with the GIL for every line), or None (stop).
Item = logging.LogRecord | str | None

# A login or sender can be up to a request line long; the log keeps this much of it, so the
# queue holds at most LOG_QUEUE_SIZE small lines whatever clients send.
MAX_LOGGED_VALUE = 256


class _QueueHandler(logging.Handler):
    """Hands records to the writer thread without formatting them, and never blocks."""

    def __init__(self, writer: _Writer) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        # Formatting happens in the writer thread. Only an exception is rendered here, while
        # its traceback still exists.
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        self.writer.put(record)


class _Writer(threading.Thread):
    """The one thread that writes log lines to stderr, a batch at a time."""

    def __init__(self, style: str) -> None:
        super().__init__(name="policyd log writer", daemon=True)
        self.queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self.formatter = Formatter(style)
        self.stream = sys.stderr
        self.dropped = 0

    def put(self, item: Item) -> None:
        if self.queue.qsize() >= LOG_QUEUE_SIZE:
            self.dropped += 1  # never wait for a slow log consumer
            return
        self.queue.put(item)

    def run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self.queue.get()]
            while len(batch) < LOG_BATCH and not self.queue.empty():
                batch.append(self.queue.get())
            lines = []
            for item in batch:
                if item is None:
                    stopping = True
                elif isinstance(item, logging.LogRecord):
                    lines.append(self.formatter.format(item))
                else:
                    lines.append(item)
            if lines:
                self._write("\n".join(lines) + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed: nothing else to tell
            pass

    def stop(self) -> None:
        """Write what is queued, waiting at most LOG_FLUSH_TIMEOUT: when nobody reads
        stderr (a full pipe), the lines are lost rather than the exit."""
        self.queue.put(None)
        self.join(LOG_FLUSH_TIMEOUT)


class Logging:
    """The process's logging: set up once by the CLI, stopped (and flushed) at exit."""

    def __init__(self, level: str, style: str) -> None:
        self.writer = _Writer(style)
        self.decisions = Formatter(style)  # the event loop's own: formatters cache the time
        self._pending: list[str] = []  # decision lines not yet handed to the writer
        root = logging.getLogger()
        self._previous = (root.handlers, root.level)
        root.handlers = [_QueueHandler(self.writer)]
        root.setLevel(level.upper())
        self.writer.start()

    def log_decision(self, request: PolicyRequest, decision: Decision) -> None:
        """The daemon's decision log: the line is formatted here and handed to the writer
        thread in batches. Waking the thread for every line would make it and the event loop
        trade the GIL back and forth for each refusal, which costs far more than the line."""
        line = self.decisions.decision(time.time(), request, decision)
        if len(self._pending) >= LOG_BATCH:
            self._flush()
        self._pending.append(line)
        if len(self._pending) == 1:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not in the daemon (policyd check): write at once
                self._flush()
            else:
                loop.call_later(LOG_FLUSH_SECONDS, self._flush)

    def _flush(self) -> None:
        if self._pending:
            self.writer.put("\n".join(self._pending))
            self._pending = []

    def stop(self) -> None:
        """Write what is still queued, then give the root logger back its old handlers."""
        self._flush()
        self.writer.stop()
        root = logging.getLogger()
        root.handlers, level = self._previous
        root.setLevel(level)


def decision_fields(request: PolicyRequest, decision: Decision) -> dict[str, str]:
    """The decision log line: who, what, the verdict and the rule; never the whole request."""
    return {
        "verdict": decision.verdict.value,
        "reason": decision.reason,
        "login": _clip(request.sasl_username),
        "sender": _clip(request.sender),
        "action": _clip(decision.action),
        "rule": str(decision.rule) if decision.rule else "-",
        "instance": _clip(request.instance) or "-",
        "queue_id": _clip(request.queue_id) or "-",
    }


def _clip(value: str) -> str:
    return value if len(value) <= MAX_LOGGED_VALUE else value[:MAX_LOGGED_VALUE] + "..."


def log_decision(request: PolicyRequest, decision: Decision) -> None:
    """The decision log line through the logging module (for `check`, tests and library use)."""
    decision_log.info("decision", extra={"fields": decision_fields(request, decision)})
