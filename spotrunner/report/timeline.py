"""The run's timeline as a PNG: sessions over wall-clock time, notices, commits, down time, metrics."""

from __future__ import annotations

import datetime as _dt
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a VM or in CI; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from spotrunner.report.cost import INTERRUPTED_REASONS, session_interval  # noqa: E402

WIDTH_IN, HEIGHT_IN, DPI = 12.0, 5.0, 100
"""The PNG is WIDTH_IN*DPI x HEIGHT_IN*DPI pixels (1200 x 500)."""

_COLOURS = {"completed": "#2e7d32", "preemption": "#ef6c00", "signal": "#f9a825", "running": "#1565c0",
            "vanished": "#9e9e9e"}


def _colour(session: dict[str, Any], ended: bool) -> str:
    if not ended:
        return _COLOURS["running"] if session.get("state") == "running" else _COLOURS["vanished"]
    return _COLOURS.get(session.get("end_reason") or "", "#c62828")


def render_png(sessions: list[dict[str, Any]], commits: list[dict[str, Any]]) -> bytes:
    """PNG bytes of the timeline (see the module docstring); an empty run gives an empty frame."""
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    try:
        _draw(fig, ax, sessions, commits)
        buffer = io.BytesIO()
        # No bbox_inches="tight": it would change the pixel size the report promises.
        fig.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _draw(fig: Any, ax: Any, sessions: list[dict[str, Any]], commits: list[dict[str, Any]]) -> None:
    intervals = [session_interval(s) for s in sessions]
    starts = [start for start, _end, _ended in intervals if start is not None]
    if not starts:
        ax.set_title("no sessions recorded")
        ax.set_yticks([])
        return
    origin = min(starts)

    def minutes(t: float) -> float:
        return (t - origin) / 60.0

    # Lanes on the left axis: sessions at y 2..3, checkpoint ticks at y 0.5..1.3.
    for (start, end, ended), session in zip(intervals, sessions):
        if start is None or end is None:
            continue
        ax.broken_barh([(minutes(start), max(minutes(end) - minutes(start), 0.05))], (2.0, 1.0),
                       facecolors=_colour(session, ended), edgecolor="black", linewidth=0.5,
                       hatch=None if ended or session.get("state") == "running" else "//")
        ax.text(minutes(start), 3.1, str(session.get("session_id", ""))[:12], fontsize=7, va="bottom")
        for notice in session.get("notices") or []:
            if notice.get("time") is not None:
                ax.plot([minutes(notice["time"])], [3.45], marker="v", color="#c62828", markersize=9, zorder=5)

    for before, after in zip(intervals, intervals[1:]):
        _start, end, _ended = before
        start = after[0]
        if end is not None and start is not None and start > end:
            ax.axvspan(minutes(end), minutes(start), color="#bdbdbd", alpha=0.45, zorder=0)

    checkpoints = [c for s in sessions for c in (s.get("checkpoints") or []) if c.get("time") is not None]
    if not checkpoints:  # older runs: fall back to the commit records still in the store
        checkpoints = [c for c in commits if c.get("time") is not None]
    for checkpoint in checkpoints:
        emergency = checkpoint.get("reason") in INTERRUPTED_REASONS
        ax.vlines(minutes(checkpoint["time"]), 0.5, 1.3, colors="#c62828" if emergency else "#424242",
                  linewidth=1.6 if emergency else 0.8)

    ax.set_ylim(0, 4.0)
    ax.set_yticks([0.9, 2.5])
    ax.set_yticklabels(["commits", "sessions"])
    when = _dt.datetime.fromtimestamp(origin, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ax.set_xlabel(f"minutes since {when}")
    ax.set_title("Run timeline")

    # One line segment per session, so the curves do not bridge the time the VM was down.
    per_session = [sorted((m for m in (s.get("metrics") or []) if m.get("time") is not None),
                          key=lambda m: m["time"]) for s in sessions]
    metrics = [m for segment in per_session for m in segment]
    handles = [Patch(facecolor=_COLOURS["preemption"], label="session (preempted)"),
               Patch(facecolor=_COLOURS["completed"], label="session (completed)"),
               Patch(facecolor="#bdbdbd", alpha=0.45, label="VM down"),
               Line2D([], [], marker="v", color="#c62828", linestyle="", label="preemption notice"),
               Line2D([], [], color="#424242", label="checkpoint commit"),
               Line2D([], [], color="#c62828", linewidth=1.6, label="emergency commit")]
    if metrics:
        twin = ax.twinx()
        for key, colour, label in (("train_loss", "#6a1b9a", "train loss"), ("test_accuracy", "#00838f", "test accuracy")):
            drawn = False
            for segment in per_session:
                points = [(minutes(m["time"]), m[key]) for m in segment if isinstance(m.get(key), (int, float))]
                if points:
                    twin.plot(*zip(*points), color=colour, linewidth=1.4, marker=".", markersize=4)
                    drawn = True
            if drawn:
                handles.append(Line2D([], [], color=colour, label=label))
        twin.set_ylabel("train loss / test accuracy")
        twin.set_ylim(bottom=0)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.07, right=0.93, top=0.92, bottom=0.30)
