"""`spotrunner status`: where a run stands, read from its store's history by any machine.

The status object (DESIGN.md fixes the first group of keys):

    run_id, state (new | in_progress | completed), step, total_steps, epoch, checkpoint_step,
    sessions, preemptions, lost_steps, weights_sha256 (null until completed)
    percent, eta_seconds, rate_steps_per_second, last_checkpoint {step, reason, age_seconds, bytes},
    metrics {step, epoch, train_loss, test_loss, test_accuracy, time}, current_session
    {session_id, host, zone, machine_type, provisioning_model, state, end_reason, updated_at},
    updated_at, notes [str]

Counting preemptions: a session counts once when it ended with end_reason `preemption` or
`signal`, or when it vanished — ended_at null (SIGKILL, power loss: the supervisor never got to
write its end) and it is not the current live session. The newest session is the current live
one while its heartbeat (`updated_at`) is younger than STALE_SECONDS; any older session with
ended_at null, or a newest one gone silent, vanished.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO

from spotrunner import history
from spotrunner.errors import ConfigError, NotFound, SpotrunnerError, StoreError
from spotrunner.stores import Store, is_gcs_url

STALE_SECONDS = 180.0
"""A running session whose record was not updated for this long is taken as vanished."""

RATE_WINDOW_SECONDS = 300.0
"""ETA uses the step rate over the newest throughput samples spanning about this long."""

WATCH_INTERVAL_SECONDS = 5.0
MAX_WATCH_REFRESHES = 100_000
"""A bound on `--watch` (about a week at 5 s); it also stops on completion or Ctrl-C."""

INTERRUPTED_REASONS = ("preemption", "signal")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def is_live(session: dict[str, Any], sessions: list[dict[str, Any]], now: float) -> bool:
    """True for the newest session when it has not ended and its heartbeat is fresh."""
    if session is not sessions[-1] or session.get("ended_at") is not None:
        return False
    heard = _number(session.get("updated_at")) or _number(session.get("started_at")) or 0.0
    return now - heard < STALE_SECONDS


def has_vanished(session: dict[str, Any], sessions: list[dict[str, Any]], now: float) -> bool:
    return session.get("ended_at") is None and not is_live(session, sessions, now)


def count_preemptions(sessions: list[dict[str, Any]], now: float) -> int:
    """Sessions ended by a preemption or signal, plus vanished ones (see the module docstring)."""
    return sum(
        1 for s in sessions
        if s.get("end_reason") in INTERRUPTED_REASONS or has_vanished(s, sessions, now)
    )


def step_rate(sessions: list[dict[str, Any]], window: float = RATE_WINDOW_SECONDS) -> float | None:
    """Steps per second over the newest session's recent throughput samples, or None."""
    for session in reversed(sessions):
        samples = [s for s in session.get("throughput") or []
                   if _number(s.get("time")) is not None and _int(s.get("step")) is not None]
        if len(samples) < 2:
            continue
        samples.sort(key=lambda s: s["time"])
        last = samples[-1]
        recent = [s for s in samples if last["time"] - s["time"] <= window]
        first = recent[0] if len(recent) >= 2 else samples[-2]
        elapsed = last["time"] - first["time"]
        if elapsed > 0 and last["step"] > first["step"]:
            return (last["step"] - first["step"]) / elapsed
    return None


def latest_metrics(sessions: list[dict[str, Any]], final: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newest metrics entry (train_loss, test_loss, test_accuracy…) of the run, or None."""
    entries = [m for s in sessions for m in (s.get("metrics") or []) if isinstance(m, dict)]
    if final and isinstance(final.get("metrics"), dict):
        entries.append(final["metrics"])
    if not entries:
        return None
    newest = max(entries, key=lambda m: (_int(m.get("step")) or -1, _number(m.get("time")) or 0.0))
    keys = ("step", "epoch", "train_loss", "test_loss", "test_accuracy", "time")
    return {key: newest.get(key) for key in keys}


def collect(store: Store, now: float | None = None) -> dict[str, Any]:
    """The status object of the run in `store` (see the module docstring); reads only.

    Raises StoreError (or ConfigError) when the store cannot be read; an empty store is
    state "new", not an error.
    """
    now = time.time() if now is None else now
    sessions = history.read_sessions(store)
    commits = history.read_commits(store)
    final = history.read_final(store)
    notes: list[str] = []

    newest_commit = commits[-1] if commits else None
    candidates = [_int(s.get("last_step")) for s in sessions]
    candidates += [_int(c.get("step")) for c in commits]
    if final:
        candidates.append(_int(final.get("step")))
    steps = [c for c in candidates if c is not None]
    step = max(steps) if steps else 0

    if final:
        state = "completed"
    elif sessions or commits:
        state = "in_progress"
    else:
        state = "new"
        notes.append(f"no run recorded at {store.url} yet; `spotrunner run` starts it")

    total_steps = next((_int(s.get("total_steps")) for s in reversed(sessions)
                        if _int(s.get("total_steps"))), None)
    epoch = None
    if final and _int(final.get("epoch")) is not None:
        epoch = _int(final.get("epoch"))
    else:
        for session in sorted(sessions, key=lambda s: _int(s.get("last_step")) or -1, reverse=True):
            if _int(session.get("epoch")) is not None:
                epoch = _int(session.get("epoch"))
                break
        if epoch is None and newest_commit is not None:
            epoch = _int(newest_commit.get("epoch"))

    percent = None
    if total_steps:
        percent = round(100.0 * min(step, total_steps) / total_steps, 2)
    rate = step_rate(sessions)
    eta = None
    if state == "completed":
        eta = 0.0
    elif total_steps and rate:
        eta = round(max(total_steps - step, 0) / rate, 1)

    last_checkpoint = None
    if newest_commit is not None:
        committed_at = _number(newest_commit.get("time"))
        last_checkpoint = {
            "step": _int(newest_commit.get("step")),
            "reason": newest_commit.get("reason"),
            "age_seconds": round(max(now - committed_at, 0.0), 1) if committed_at is not None else None,
            "bytes": _int(newest_commit.get("size")),
        }

    current = None
    if sessions:
        newest = sessions[-1]
        if newest.get("ended_at") is not None:
            session_state = "ended"
        elif is_live(newest, sessions, now):
            session_state = "running"
        else:
            session_state = "vanished"
            heard = _number(newest.get("updated_at")) or _number(newest.get("started_at")) or now
            notes.append(f"session {newest.get('session_id')} on {newest.get('host')} has not reported for "
                         f"{_duration(now - heard)}: the VM is probably down or was preempted")
        current = {key: newest.get(key) for key in
                   ("session_id", "host", "zone", "machine_type", "provisioning_model", "end_reason", "updated_at")}
        current["state"] = session_state

    return {
        "run_id": _run_id(store, sessions),
        "state": state,
        "step": step,
        "total_steps": total_steps,
        "epoch": epoch,
        "checkpoint_step": _int(newest_commit.get("step")) if newest_commit is not None else None,
        "sessions": len(sessions),
        "preemptions": count_preemptions(sessions, now),
        "lost_steps": sum(_int(s.get("lost_steps")) or 0 for s in sessions),
        "weights_sha256": final.get("weights_sha256") if final else None,
        "percent": percent,
        "eta_seconds": eta,
        "rate_steps_per_second": round(rate, 3) if rate else None,
        "last_checkpoint": last_checkpoint,
        "metrics": latest_metrics(sessions, final),
        "current_session": current,
        "updated_at": now,
        "notes": notes,
    }


def _run_id(store: Store, sessions: list[dict[str, Any]]) -> str:
    for session in sessions:
        if session.get("run_id"):
            return str(session["run_id"])
    return store.url.rstrip("/").rsplit("/", 1)[-1]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"  # pragma: no cover


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_human(status: dict[str, Any]) -> str:
    """A short aligned table of the status object, for a terminal."""
    rows: list[tuple[str, str]] = [("run", str(status["run_id"])), ("state", status["state"])]
    if status["state"] != "new":
        progress = f"step {status['step']}"
        if status["total_steps"]:
            progress += f" / {status['total_steps']} ({status['percent']:.1f} %)"
        if status["epoch"] is not None:
            progress += f", epoch {status['epoch']}"
        rows.append(("progress", progress))
        if status["state"] == "in_progress":
            eta = _duration(status["eta_seconds"]) if status["eta_seconds"] is not None else "unknown"
            rate = status["rate_steps_per_second"]
            rows.append(("eta", f"{eta}" + (f" at {rate:.2f} steps/s" if rate else "")))
        checkpoint = status["last_checkpoint"]
        if checkpoint:
            rows.append(("last checkpoint", f"step {checkpoint['step']} ({checkpoint['reason']}), "
                         f"{_duration(checkpoint['age_seconds'])} ago, {_bytes(checkpoint['bytes'])}"))
        else:
            rows.append(("last checkpoint", "none yet"))
        rows.append(("sessions", str(status["sessions"])))
        rows.append(("preemptions", str(status["preemptions"])))
        rows.append(("lost steps", str(status["lost_steps"])))
        metrics = status["metrics"]
        if metrics:
            rows.append(("metrics", f"epoch {_fmt(metrics['epoch'])}: train loss {_fmt(metrics['train_loss'])}, "
                         f"test loss {_fmt(metrics['test_loss'])}, test accuracy {_fmt(metrics['test_accuracy'])}"))
        current = status["current_session"]
        if current:
            where = " ".join(str(current[k]) for k in ("host", "zone", "machine_type") if current.get(k))
            state = current["state"] + (f" ({current['end_reason']})" if current.get("end_reason") else "")
            rows.append(("session", f"{current['session_id']} on {where or 'unknown host'}: {state}"))
        if status["weights_sha256"]:
            rows.append(("weights sha256", status["weights_sha256"]))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines += [f"note: {note}" for note in status["notes"]]
    return "\n".join(lines)


def open_for_reading(store_url: str, run_id: str) -> Store:
    """The run's store opened for reading only; ConfigError when it cannot be read.

    Unlike `open_store`, a local directory needs to be readable, not writable: status and
    report run from any machine, often with read-only access.
    """
    if not store_url:
        raise ConfigError("--store is empty; use gs://BUCKET[/PREFIX] or a local directory")
    if not run_id:
        raise ConfigError("--run-id is empty; name the run to show")
    if is_gcs_url(store_url) or "://" in store_url:
        from spotrunner.stores import open_store

        with translate_google_errors(store_url):
            return open_store(store_url, run_id)
    from spotrunner.stores.local import LocalStore

    root = os.path.abspath(store_url)
    for path in (root, os.path.join(root, run_id)):
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise ConfigError(f"--store {store_url}: {path} is not a directory; point --store at the runs directory")
            if not os.access(path, os.R_OK | os.X_OK):
                raise ConfigError(f"--store {store_url}: {path} is not readable by this user; "
                                  "fix its permissions or run as a user who can read it")
    return LocalStore(os.path.join(root, run_id))


@contextmanager
def translate_google_errors(store_url: str) -> Iterator[None]:
    """Turns google client exceptions that leak out of a store into one-line spotrunner errors.

    The GCS store raises ConfigError/StoreError itself; this is the boundary's safety net.
    """
    try:
        yield
    except SpotrunnerError:
        raise
    except PermissionError as exc:
        raise ConfigError(f"--store {store_url}: permission denied ({exc.strerror or exc}); "
                          "fix its permissions or use an account that can read it") from None
    except Exception as exc:
        module = type(exc).__module__ or ""
        if not module.startswith(("google.", "requests.", "urllib3.")):
            raise
        name = type(exc).__name__
        code = getattr(exc, "code", None)
        if name in ("Forbidden", "Unauthorized", "PermissionDenied", "DefaultCredentialsError",
                    "RefreshError") or code in (401, 403):
            raise ConfigError(f"--store {store_url}: access denied ({name}); grant this account "
                              "roles/storage.objectViewer on the bucket or fix its credentials") from None
        if name == "NotFound" or code == 404:
            raise ConfigError(f"--store {store_url}: bucket not found; check the bucket name") from None
        message = str(exc).splitlines()[0] if str(exc) else name
        raise StoreError(f"--store {store_url}: cannot read ({name}: {message[:200]})") from None


def read_status(store_url: str, run_id: str, now: float | None = None) -> dict[str, Any]:
    """The status object of `run_id` under `store_url`; ConfigError/StoreError when unreadable."""
    store = open_for_reading(store_url, run_id)
    with translate_google_errors(store_url):
        try:
            return collect(store, now=now)
        except NotFound:
            # history reads absorb a missing key; only a listing can say this: no such bucket.
            raise ConfigError(f"--store {store_url}: not found; check the bucket name and prefix") from None


def run(store_url: str, run_id: str, as_json: bool, watch: bool, *, interval: float = WATCH_INTERVAL_SECONDS,
        stream: TextIO | None = None, max_refreshes: int = MAX_WATCH_REFRESHES,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """Print the run's status (a table, or one JSON object per line) and return the exit code (0).

    With `watch`, redraws every `interval` seconds — in place on a terminal — until the run
    completes, Ctrl-C, or `max_refreshes` draws. Unreadable stores raise ConfigError/StoreError.
    """
    stream = stream or sys.stdout
    if watch and interval <= 0:
        raise ConfigError(f"watch interval {interval} must be > 0 seconds")
    drawn_lines = 0
    in_place = watch and not as_json and stream.isatty()
    try:
        for refresh in range(max_refreshes if watch else 1):
            status = read_status(store_url, run_id)
            if as_json:
                text = json.dumps(status, sort_keys=True)
            else:
                text = format_human(status)
                if watch:
                    text += f"\n(refreshing every {interval:g} s; Ctrl-C to stop)"
            if in_place and drawn_lines:
                # Move to the top of the previous drawing and clear to the end of the screen.
                stream.write(f"\x1b[{drawn_lines}F\x1b[J")
            stream.write(text + "\n")
            stream.flush()
            drawn_lines = text.count("\n") + 1
            if status["state"] == "completed" or refresh + 1 >= max_refreshes:
                break
            if watch:
                sleep(interval)
    except KeyboardInterrupt:
        stream.write("\n")
        stream.flush()
    return 0
