"""The report's figures as tables, rendered to a self-contained HTML page and to Markdown.

Both formats come from the same list of tables, so they always show the same numbers.
Unknown values (no price, no samples) are empty cells, never estimates.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from dataclasses import dataclass, field
from typing import Any

from spotrunner.report.timeline import DPI, HEIGHT_IN, WIDTH_IN


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    intro: str = ""
    notes: list[str] = field(default_factory=list)


def money(value: float | None) -> str:
    return "" if value is None else f"${value:,.4f}"


def percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} %"


def seconds(value: float | None, digits: int = 0) -> str:
    if value is None:
        return ""
    text = f"{value:,.{digits}f} s"
    if value >= 90:
        whole = int(round(value))
        hours, rest = divmod(whole, 3600)
        minutes, secs = divmod(rest, 60)
        text += f" ({hours}h{minutes:02d}m{secs:02d}s)" if hours else f" ({minutes}m{secs:02d}s)"
    return text


def utc(value: float | None) -> str:
    if value is None:
        return ""
    return _dt.datetime.fromtimestamp(value, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def size(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value / 1e6:,.2f} MB"


def number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def tables(data: dict[str, Any]) -> list[Table]:
    """The report's content as titled tables of display strings."""
    status, cost, perf = data["status"], data["cost"], data["performance"]
    totals, interruptions, net = cost["totals"], cost["interruptions"], cost["net"]
    out: list[Table] = []

    span = [r for r in cost["rows"] if r["started_at"] is not None]
    summary = [
        ["run", str(status["run_id"])], ["state", status["state"]],
        ["step", f"{status['step']}" + (f" of {status['total_steps']}" if status["total_steps"] else "")],
        ["sessions", str(status["sessions"])], ["preemptions", str(status["preemptions"])],
        ["steps recomputed after restarts", str(status["lost_steps"])],
    ]
    if span:
        first = min(r["started_at"] for r in span)
        last = max(r["ended_at"] or r["started_at"] for r in span)
        summary += [["first session started (UTC)", utc(first)], ["last session ended (UTC)", utc(last)],
                    ["wall-clock time", seconds(last - first)]]
    if status["weights_sha256"]:
        summary.append(["weights sha256", status["weights_sha256"]])
    out.append(Table("Summary", ["", ""], summary))

    session_rows = []
    for row in cost["rows"]:
        session_rows.append([
            str(row["session_id"]), row["host"] or "", row["zone"] or "", row["machine_type"] or "",
            row["gpus"], row["provisioning_model"] or "", utc(row["started_at"]),
            utc(row["ended_at"]) + ("" if row["ended"] else " (last heartbeat)"), seconds(row["billed_seconds"]),
            money(row["spot_per_hour"]), money(row["on_demand_per_hour"]),
            money(row["spot_cost"]), money(row["on_demand_cost"]),
        ])
    session_rows.append(["total", "", "", "", "", "", "", "", seconds(totals["billed_seconds"]), "", "",
                         money(totals["spot_cost"]), money(totals["on_demand_cost"])])
    out.append(Table(
        "Cost per session",
        ["session", "host", "zone", "machine type", "GPUs", "provisioning", "started (UTC)", "ended (UTC)",
         "billed", "Spot $/h", "on-demand $/h", "Spot cost", "on-demand cost"],
        session_rows,
        intro="VM time billed per session (supervisor start to end, at least one minute; boot and shutdown "
              "around it are billed too but not recorded, so this is a lower bound) × the hourly list price of "
              "the machine type plus its GPUs.",
    ))

    out.append(Table("Saving", ["", ""], [
        ["cost at Spot prices", money(totals["spot_cost"])],
        ["same VM time at on-demand prices", money(totals["on_demand_cost"])],
        ["saving", money(totals["saving"])],
        ["saving %", percent(totals["saving_percent"])],
    ]))

    recomputed = interruptions["recomputed_seconds"]
    step_time = interruptions["mean_step_seconds"]
    out.append(Table("What the interruptions cost", ["", ""], [
        ["time down between sessions (not billed; delays the result)", seconds(interruptions["down_seconds"])],
        ["restarts: session start to first step", seconds(interruptions["restart_seconds"], 1)],
        ["stops: notice to session end (emergency checkpoint, exit)", seconds(interruptions["stop_seconds"], 1)],
        [f"steps recomputed: {interruptions['lost_steps']} × "
         f"{'' if step_time is None else f'{step_time:.4f} s'} mean step time", seconds(recomputed, 1)],
        ["checkpoint snapshot stalls", seconds(interruptions["checkpoint_stall_seconds"], 1)],
        ["billed time that trained nothing new", seconds(interruptions["wasted_seconds"], 1)],
        ["… at Spot prices", money(interruptions["wasted_spot_cost"])],
        ["on-demand cost of the useful time (an uninterrupted run)", money(net["on_demand_useful_cost"])],
        ["Spot cost of all billed time", money(net["spot_cost"])],
        ["net saving", money(net["net_saving"])],
        ["net saving %", percent(net["net_saving_percent"])],
    ]))

    out.append(Table("Throughput per session", ["session", "host", "img/s (median)", "samples"], [
        [str(s["session_id"]), s["host"] or "", number(s["img_per_s_median"]), str(s["samples"])]
        for s in perf["sessions"]
    ]))
    out.append(Table("Time to first step after each (re)start", ["session", "resumed from step", "seconds"], [
        [str(f["session_id"]), str(f["resumed_from_step"]), seconds(f["seconds"], 1)] for f in perf["first_steps"]
    ]))
    ck = perf["checkpoints"]
    out.append(Table("Checkpoints", ["", "median", "max"], [
        [f"size ({ck['count']} commits)", size(ck["bytes_median"]), size(ck["bytes_max"])],
        ["commit latency", seconds(ck["commit_seconds_median"], 2), seconds(ck["commit_seconds_max"], 2)],
        [f"snapshot stall ({ck['records']} records in store)", seconds(ck["snapshot_seconds_median"], 2),
         seconds(ck["snapshot_seconds_max"], 2)],
        ["background persist", seconds(ck["persist_seconds_median"], 2), seconds(ck["persist_seconds_max"], 2)],
    ]))
    out.append(Table("Emergency commits", ["session", "step", "reason", "notice source", "commit latency",
                                           "notice to commit"], [
        [str(e["session_id"]), str(e["step"]), str(e["reason"]), e["source"] or "",
         seconds(e["commit_seconds"], 2), seconds(e["notice_to_commit_seconds"], 2)]
        for e in perf["emergency"]
    ]))
    return out


def _notes(data: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(data["cost"]["notes"] + data["status"]["notes"]))


def _sources(data: dict[str, Any]) -> str:
    return "; ".join(data["cost"]["sources"])


def render_markdown(data: dict[str, Any], png_name: str) -> str:
    """The report as Markdown, the timeline referenced as `png_name` next to it."""
    lines = [f"# spotrunner report: {data['status']['run_id']}", "",
             f"Generated {utc(data['generated_at'])} UTC. Prices: {_sources(data)}.", "",
             f"![Run timeline]({png_name})", ""]
    notes = _notes(data)
    if notes:
        lines += ["**Notes**", ""] + [f"- {note}" for note in notes] + [""]
    for table in tables(data):
        lines += [f"## {table.title}", ""]
        if table.intro:
            lines += [table.intro, ""]
        if not table.rows:
            lines += ["(none)", ""]
            continue
        lines.append("| " + " | ".join(h or " " for h in table.headers) + " |")
        lines.append("|" + "|".join("---" for _ in table.headers) + "|")
        for row in table.rows:
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        lines.append("")
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #212121; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #cfd8dc; padding: 0.25em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eceff1; }
.notes { background: #fff8e1; border-left: 4px solid #f9a825; padding: 0.5em 1em; }
img { max-width: 100%; }
"""


_NUMERIC = re.compile(r"^-?\$?[\d,]+(\.\d+)?( s| %| MB)?( \(.*\))?$")


def _is_numeric(cell: str) -> bool:
    return bool(_NUMERIC.match(cell))


def render_html(data: dict[str, Any], png: bytes) -> str:
    """The report as one self-contained HTML page: styles inline, the PNG as a base64 data URI."""
    esc = html.escape
    title = f"spotrunner report: {data['status']['run_id']}"
    width, height = int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI)
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>Generated {esc(utc(data['generated_at']))} UTC. Prices: {esc(_sources(data))}.</p>",
        f'<img alt="Run timeline" width="{width}" height="{height}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">',
    ]
    notes = _notes(data)
    if notes:
        parts.append('<div class="notes"><strong>Notes</strong><ul>')
        parts += [f"<li>{esc(note)}</li>" for note in notes]
        parts.append("</ul></div>")
    for table in tables(data):
        parts.append(f"<h2>{esc(table.title)}</h2>")
        if table.intro:
            parts.append(f"<p>{esc(table.intro)}</p>")
        if not table.rows:
            parts.append("<p>(none)</p>")
            continue
        parts.append("<table>")
        if any(table.headers):
            parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.headers) + "</tr>")
        for row in table.rows:
            cells = "".join(f'<td class="n">{esc(c)}</td>' if _is_numeric(c) and i else f"<td>{esc(c)}</td>"
                            for i, c in enumerate(row))
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
