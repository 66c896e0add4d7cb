"""Structured logging: JSON lines Cloud Logging understands, or readable lines on a terminal.

One ordered chain of structlog processors serves spotrunner's own events and stdlib
logging (torch, google-cloud-storage, urllib3). Each JSON line carries `severity`,
`message`, `time`, `event` and `logging.googleapis.com/labels` (run_id, component), with
the event's fields as top-level keys, so the Ops Agent's JSON parser turns it into a
`jsonPayload` with the right severity. Configure once per process with `configure()`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import threading
from typing import Any, TextIO

import structlog

LABELS_KEY = "logging.googleapis.com/labels"
SOURCE_KEY = "logging.googleapis.com/sourceLocation"
_SEVERITY = {
    "debug": "DEBUG",
    "info": "INFO",
    "warning": "WARNING",
    "warn": "WARNING",
    "error": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
}
# Fields shown in the human-readable message, in this order, when an event has them.
_MESSAGE_FIELDS = ("step", "epoch", "reason", "source", "code", "bytes", "seconds", "state")

_labels: dict[str, str] = {}
_stream: TextIO = sys.stdout
_console_lock = threading.Lock()
_status_line = ""


def _add_time_and_severity(_logger: Any, method: str, event_dict: dict) -> dict:
    event_dict.setdefault(
        "time", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    level = event_dict.pop("level", None) or method
    event_dict["severity"] = _SEVERITY.get(str(level).lower(), "DEFAULT")
    return event_dict


def _add_labels(_logger: Any, _method: str, event_dict: dict) -> dict:
    event_dict[LABELS_KEY] = dict(_labels)
    return event_dict


def _add_message(_logger: Any, _method: str, event_dict: dict) -> dict:
    """`message` is what Logs Explorer shows in the summary line."""
    if "message" in event_dict:
        return event_dict
    event = str(event_dict.get("event", ""))
    if event_dict.pop("_foreign", False):
        # A stdlib record: its text is the message; the event says where it came from.
        event_dict["message"] = event
        event_dict["event"] = "library_log"
        return event_dict
    parts = [event.replace("_", " ")]
    details = [f"{name}={event_dict[name]}" for name in _MESSAGE_FIELDS if name in event_dict]
    if "error" in event_dict:
        details.append(f"error={event_dict['error']}")
    if details:
        parts.append(" ".join(details))
    event_dict["message"] = ": ".join(parts)
    return event_dict


def _mark_foreign(_logger: Any, _method: str, event_dict: dict) -> dict:
    event_dict["_foreign"] = True
    record = event_dict.get("_record")
    if record is not None:
        event_dict["logger"] = record.name
    return event_dict


def _render_json(_logger: Any, _method: str, event_dict: dict) -> str:
    event_dict.pop("_record", None)
    event_dict.pop("_from_structlog", None)
    return json.dumps(event_dict, default=str, separators=(",", ":"))


_CONSOLE_HIDDEN = {"time", "severity", "message", "event", LABELS_KEY, "logger", "_record", "_from_structlog"}


def _render_console(_logger: Any, _method: str, event_dict: dict) -> str:
    stamp = str(event_dict.get("time", ""))[11:19]
    severity = event_dict.get("severity", "INFO")
    extras = " ".join(
        f"{key}={value}" for key, value in event_dict.items()
        if key not in _CONSOLE_HIDDEN and key not in _MESSAGE_FIELDS and key != "error"
    )
    line = f"{stamp} {severity:<7} {event_dict.get('message', '')}"
    return f"{line}  {extras}" if extras else line


class _Writer:
    """Writes whole lines, keeping a terminal status line (the progress bar) at the bottom."""

    def msg(self, line: str) -> None:
        with _console_lock:
            if _status_line and _stream.isatty():
                _stream.write("\r\x1b[K" + line + "\n" + _status_line)
            else:
                _stream.write(line + "\n")
            _stream.flush()

    log = debug = info = warning = warn = error = critical = exception = failure = fatal = msg


def set_status_line(text: str) -> None:
    """Draw `text` as the last line of a terminal (no-op when stdout is not one)."""
    global _status_line
    if not _stream.isatty():
        return
    with _console_lock:
        _status_line = text
        _stream.write("\r\x1b[K" + text)
        _stream.flush()


def clear_status_line() -> None:
    global _status_line
    if _stream.isatty() and _status_line:
        with _console_lock:
            _status_line = ""
            _stream.write("\r\x1b[K")
            _stream.flush()


def is_console(log_format: str = "auto", stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    if log_format == "auto":
        return stream.isatty()
    return log_format == "console"


def configure(component: str, run_id: str | None = None, *, log_format: str = "auto",
              level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Set up structlog and stdlib logging for this process; safe to call again."""
    global _stream
    _stream = stream or sys.stdout
    _labels.clear()
    _labels["component"] = component
    if run_id:
        _labels["run_id"] = run_id
    renderer = _render_console if is_console(log_format, _stream) else _render_json
    shared = [_add_time_and_severity, _add_labels]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, _add_message, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: _Writer(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, _mark_foreign, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _add_message, renderer],
    )

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                _Writer().msg(formatter.format(record))
            except Exception:  # pragma: no cover - logging must never raise
                self.handleError(record)

    root = logging.getLogger()
    root.handlers[:] = [_Handler()]
    root.setLevel(logging.WARNING)  # libraries: warnings and worse only
    logging.captureWarnings(True)


def set_label(name: str, value: str) -> None:
    _labels[name] = value


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger(**bound)
