"""`spotrunner report`: what a run cost and what preemption took, as HTML, Markdown and a PNG.

    build(store, out_dir, prices) -> {"html": path, "markdown": path, "png": path}
    run(store_url, run_id, out_dir, prices_file) -> exit code

The report reads only the run's history (sessions, commit records, final.json; see
spotrunner/history.py) and never opens a checkpoint blob.
"""

from __future__ import annotations

import os
import time
from typing import Any

from spotrunner import history
from spotrunner.errors import ConfigError, NotFound
from spotrunner.report import cost
from spotrunner.report.cost import INTERRUPTED_REASONS, load_prices, median_max
from spotrunner.stores import Store

HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"
PNG_NAME = "timeline.png"

__all__ = ["build", "run", "analyse", "performance", "load_prices", "HTML_NAME", "MARKDOWN_NAME", "PNG_NAME"]


def performance(sessions: list[dict[str, Any]], commits: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput per session, time to first step per (re)start, checkpoint sizes and latencies."""
    per_session = []
    for session in sessions:
        rates = [s["img_per_s"] for s in session.get("throughput") or [] if isinstance(s.get("img_per_s"), (int, float))]
        median, _max = median_max(rates)
        per_session.append({"session_id": session.get("session_id"), "host": session.get("host"),
                            "img_per_s_median": median, "samples": len(rates)})

    first_steps = []
    for session in sessions:
        for start in session.get("trainer_starts") or []:
            began, first = start.get("time"), start.get("first_step_at")
            first_steps.append({
                "session_id": session.get("session_id"), "resumed_from_step": start.get("resumed_from_step"),
                "seconds": first - began if isinstance(first, (int, float)) and isinstance(began, (int, float)) else None,
            })

    checkpoints = [c for s in sessions for c in (s.get("checkpoints") or [])]
    size_median, size_max = median_max([c.get("bytes") for c in checkpoints])
    latency_median, latency_max = median_max([c.get("seconds") for c in checkpoints])
    snapshot_median, snapshot_max = median_max([c.get("snapshot_seconds") for c in commits])
    persist_median, persist_max = median_max([c.get("persist_seconds") for c in commits])

    emergency = []
    for session in sessions:
        notices = sorted((n for n in session.get("notices") or [] if isinstance(n.get("time"), (int, float))),
                         key=lambda n: n["time"])
        for checkpoint in session.get("checkpoints") or []:
            if checkpoint.get("reason") not in INTERRUPTED_REASONS:
                continue
            committed = checkpoint.get("time")
            before = [n for n in notices if isinstance(committed, (int, float)) and n["time"] <= committed]
            notice = before[-1] if before else None
            emergency.append({
                "session_id": session.get("session_id"), "step": checkpoint.get("step"),
                "reason": checkpoint.get("reason"), "source": notice.get("source") if notice else None,
                "commit_seconds": checkpoint.get("seconds"),
                "notice_to_commit_seconds": committed - notice["time"] if notice else None,
            })
    return {
        "sessions": per_session, "first_steps": first_steps,
        "checkpoints": {
            "count": len(checkpoints), "bytes_median": size_median, "bytes_max": size_max,
            "commit_seconds_median": latency_median, "commit_seconds_max": latency_max,
            "records": len(commits), "snapshot_seconds_median": snapshot_median, "snapshot_seconds_max": snapshot_max,
            "persist_seconds_median": persist_median, "persist_seconds_max": persist_max,
        },
        "emergency": emergency,
    }


def analyse(store: Store, prices: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, as plain data (also what tests check)."""
    from spotrunner import status as status_module

    sessions = history.read_sessions(store)
    commits = history.read_commits(store)
    return {
        "status": status_module.collect(store),
        "cost": cost.compute(sessions, commits, prices),
        "performance": performance(sessions, commits),
        "sessions": sessions,
        "commits": commits,
        "generated_at": time.time(),
    }


def build(store: Store, out_dir: str, prices: dict[str, Any]) -> dict[str, str]:
    """Write report.html (self-contained), report.md and timeline.png into `out_dir`; their paths.

    Returns {"html": …, "markdown": …, "png": …}. `prices` comes from `load_prices()`.
    """
    from spotrunner.report import render, timeline

    data = analyse(store, prices)
    png = timeline.render_png(data["sessions"], data["commits"])
    os.makedirs(out_dir, exist_ok=True)
    paths = {"html": os.path.join(out_dir, HTML_NAME), "markdown": os.path.join(out_dir, MARKDOWN_NAME),
             "png": os.path.join(out_dir, PNG_NAME)}
    _write(paths["png"], png)
    _write(paths["html"], render.render_html(data, png).encode())
    _write(paths["markdown"], render.render_markdown(data, PNG_NAME).encode())
    return paths


def _write(path: str, data: bytes) -> None:
    """Replace `path` atomically, so a reader never sees half a report."""
    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


def run(store_url: str, run_id: str, out_dir: str, prices_file: str | None) -> int:
    """Build the report of `run_id` under `store_url` into `out_dir`, print where it is; exit code.

    Raises ConfigError (bad --prices, --out or store) or StoreError (store unreadable).
    """
    from spotrunner.status import open_for_reading, translate_google_errors

    prices = load_prices(prices_file)
    if not out_dir:
        raise ConfigError("--out is empty; name a directory for the report")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir}: exists and is not a directory; choose a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot create ({exc.strerror}); choose a writable directory") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out_dir}: not writable by this user; choose a writable directory")
    store = open_for_reading(store_url, run_id)
    try:
        with translate_google_errors(store_url):
            paths = build(store, out_dir, prices)
    except NotFound:
        raise ConfigError(f"--store {store_url}: not found; check the bucket name and prefix") from None
    print(f"report written: {paths['html']} (also {paths['markdown']}, {paths['png']})")
    return 0
