"""What a run cost on Spot VMs, what it would have cost on-demand, and what interruptions took.

Prices come from the bundled `prices.toml` (a dated table of list prices), optionally
overridden or extended by `--prices FILE` in the same schema:

    [machine_types."REGION"."TYPE"]   on_demand = USD/h, spot = USD/h   (vCPUs + memory; no GPUs)
    [gpus."REGION"."GPU"]             on_demand = USD/h, spot = USD/h   (one GPU)

A session's hourly price is its machine type's plus each attached GPU's times its count.
Nothing is estimated: a machine type, GPU or region missing from the table leaves that
session's cost cells empty with a note saying which price to add.

Billed time of a session is started_at → ended_at (or → updated_at, the last heartbeat, for a
session that vanished or is still running), at least one minute (GCE bills a minimum of one
minute, then per second). It is measured by the supervisor, so VM boot before it and shutdown
after it are not included: the figures are a lower bound on the bill.

Interruption cost, in billed seconds that trained nothing new (an uninterrupted on-demand run
would not have spent them):
    restart   time from a later session's start to its first training step (the first
              session's startup is paid by any run)
    stop      time from a preemption notice to the end of that session (emergency checkpoint, exit)
    recomputed  lost_steps × mean step time (steps redone because a session resumed behind
              where an earlier one had got to)
    checkpoint  training stalls for checkpoint snapshots (snapshot_seconds of the commit records
              still in the store, emergency ones excluded: `stop` holds them)
Time down between sessions is not billed but delays the result; it is reported separately.
Net saving = on-demand price × (billed − wasted) time − Spot cost of all billed time.
"""

from __future__ import annotations

import math
import os
import statistics
import tomllib
from typing import Any

from spotrunner.errors import ConfigError

BUNDLED_PRICES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prices.toml")
MIN_BILLED_SECONDS = 60.0
PRICE_KINDS = ("on_demand", "spot")
SECTIONS = ("machine_types", "gpus")
INTERRUPTED_REASONS = ("preemption", "signal")


def region_of(zone: str | None) -> str | None:
    """`us-central1` for `us-central1-a` (a zone minus its last `-x`); None without a zone."""
    if not zone or "-" not in zone:
        return None
    return zone.rsplit("-", 1)[0]


def _validate(table: dict[str, Any], origin: str) -> dict[str, Any]:
    """`table` checked against the price schema; ConfigError naming the bad entry and the fix."""
    clean: dict[str, Any] = {"meta": {}, "machine_types": {}, "gpus": {}}
    for key, value in table.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: [{key}] must be a table of regions; see spotrunner/report/prices.toml")
            for region, entries in value.items():
                if not isinstance(entries, dict):
                    raise ConfigError(f"{origin}: {key}.{region} must be a table of types; "
                                      f"write [{key}.\"{region}\".\"TYPE\"] on_demand = …, spot = …")
                for name, price in entries.items():
                    where = f"{key}.{region}.{name}"
                    if not isinstance(price, dict):
                        raise ConfigError(f"{origin}: {where} must be a table with on_demand and spot (USD per hour)")
                    unknown = sorted(set(price) - set(PRICE_KINDS))
                    if unknown:
                        raise ConfigError(f"{origin}: {where} has unknown key {unknown[0]!r}; only on_demand and spot")
                    for kind in PRICE_KINDS:
                        amount = price.get(kind)
                        if isinstance(amount, bool) or not isinstance(amount, (int, float)) \
                                or not math.isfinite(amount) or amount < 0:
                            raise ConfigError(f"{origin}: {where}.{kind} must be a number of USD per hour >= 0, "
                                              f"got {amount!r}; fix the entry")
                    clean[key].setdefault(region, {})[name] = {k: float(price[k]) for k in PRICE_KINDS}
        elif key in ("source", "date", "note", "currency", "unit"):
            if not isinstance(value, str):
                raise ConfigError(f"{origin}: {key} must be a string")
            clean["meta"][key] = value
        else:
            raise ConfigError(f"{origin}: unknown top-level key {key!r}; use [machine_types.…] and [gpus.…] tables")
    return clean


def _parse(path: str, origin: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{origin}: file not found; pass an existing TOML price table") from None
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read ({exc.strerror}); fix its permissions") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML ({exc}); fix the file") from None
    return _validate(table, origin)


def load_prices(path: str | None = None) -> dict[str, Any]:
    """The bundled price table, with `path`'s entries (same schema) added or replacing ones.

    Returns {"machine_types": {region: {type: {on_demand, spot}}}, "gpus": {…}, "sources": [str]}.
    """
    bundled = _parse(BUNDLED_PRICES, f"bundled price table {BUNDLED_PRICES}")
    prices: dict[str, Any] = {"machine_types": bundled["machine_types"], "gpus": bundled["gpus"], "sources": []}
    meta = bundled["meta"]
    prices["sources"].append(f"bundled table: {meta.get('source', 'unknown source')}, as published on "
                             f"{meta.get('date', 'unknown date')}")
    if path is not None:
        override = _parse(path, f"--prices {path}")
        for section in SECTIONS:
            for region, entries in override[section].items():
                prices[section].setdefault(region, {}).update(entries)
        extra = override["meta"]
        prices["sources"].insert(0, f"--prices {path}" + (f": {extra['source']}" if extra.get("source") else "")
                                 + (f", {extra['date']}" if extra.get("date") else ""))
    return prices


# nvidia-smi / /proc model names -> GCE accelerator types. history.py's schema says
# gpus is [{"type", "count"}]; some writers record the driver's model names instead.
_MODEL_TO_ACCELERATOR = (
    ("a100-sxm4-80gb", "nvidia-a100-80gb"), ("a100 80gb", "nvidia-a100-80gb"), ("a100", "nvidia-tesla-a100"),
    ("h100", "nvidia-h100-80gb"), ("l4", "nvidia-l4"), ("t4", "nvidia-tesla-t4"), ("v100", "nvidia-tesla-v100"),
    ("p100", "nvidia-tesla-p100"), ("p4", "nvidia-tesla-p4"),
)


def accelerator_type(name: str) -> str:
    """The GCE accelerator type for a GPU name: itself if already one, else mapped from a model name."""
    lowered = name.strip().lower()
    if lowered.startswith("nvidia-"):
        return lowered
    words = lowered.replace("nvidia", " ").replace("tesla", " ").split()
    for needle, accelerator in _MODEL_TO_ACCELERATOR:
        if (" " in needle and needle in lowered) or any(w == needle or w.startswith(needle + "-") for w in words):
            return accelerator
    return name


def normalise_gpus(value: Any) -> list[dict[str, Any]]:
    """[{"type": GCE accelerator type, "count": n}] from a session's gpus (dicts or model-name strings)."""
    counts: dict[str, int] = {}
    for entry in value or []:
        if isinstance(entry, dict):
            kind, count = entry.get("type"), entry.get("count", 1)
        else:
            kind, count = entry, 1
        if not isinstance(kind, str) or not kind or not isinstance(count, int) or count <= 0:
            continue
        kind = accelerator_type(kind)
        counts[kind] = counts.get(kind, 0) + count
    return [{"type": kind, "count": count} for kind, count in counts.items()]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def session_interval(session: dict[str, Any]) -> tuple[float | None, float | None, bool]:
    """(start, end, ended) of the session's billed time; end is the last heartbeat when not ended."""
    start = _number(session.get("started_at"))
    ended = _number(session.get("ended_at"))
    if ended is not None:
        return start, ended, True
    return start, _number(session.get("updated_at")) or start, False


def billed_seconds(session: dict[str, Any]) -> float | None:
    start, end, _ended = session_interval(session)
    if start is None or end is None:
        return None
    return max(end - start, MIN_BILLED_SECONDS)


def hourly_price(session: dict[str, Any], prices: dict[str, Any]) -> tuple[dict[str, float] | None, str | None]:
    """({"on_demand", "spot"} USD/h for the session's VM and GPUs, None) or (None, why not)."""
    machine_type = session.get("machine_type")
    if not machine_type:
        return None, (f"session {session.get('session_id')} on {session.get('host') or 'an unknown host'} ran off "
                      "GCE (no machine type recorded); not priced")
    region = region_of(session.get("zone"))
    if region is None:
        return None, f"session {session.get('session_id')}: no zone recorded for {machine_type}; not priced"
    vm = prices["machine_types"].get(region, {}).get(machine_type)
    if vm is None:
        return None, f"no price for {machine_type} in {region}; pass --prices with [machine_types.\"{region}\".\"{machine_type}\"]"
    total = dict(vm)
    for gpu in normalise_gpus(session.get("gpus")):
        kind, count = gpu["type"], gpu["count"]
        price = prices["gpus"].get(region, {}).get(kind)
        if price is None:
            return None, f"no price for GPU {kind} in {region}; pass --prices with [gpus.\"{region}\".\"{kind}\"]"
        for key in PRICE_KINDS:
            total[key] += price[key] * count
    return total, None


def mean_step_seconds(sessions: list[dict[str, Any]]) -> float | None:
    """Seconds per training step over all consecutive throughput samples within each session."""
    seconds = steps = 0.0
    for session in sessions:
        samples = sorted((s for s in session.get("throughput") or []
                          if _number(s.get("time")) is not None and _number(s.get("step")) is not None),
                         key=lambda s: s["time"])
        for before, after in zip(samples, samples[1:]):
            if after["step"] > before["step"]:
                seconds += after["time"] - before["time"]
                steps += after["step"] - before["step"]
    return seconds / steps if steps else None


def _gpus_text(session: dict[str, Any]) -> str:
    gpus = [f"{g['count']} x {g['type']}" for g in normalise_gpus(session.get("gpus"))]
    return ", ".join(gpus)


def compute(sessions: list[dict[str, Any]], commits: list[dict[str, Any]], prices: dict[str, Any]) -> dict[str, Any]:
    """The cost breakdown of a run: per-session rows, totals, interruption cost, net saving, notes."""
    notes: list[str] = []
    rows = []
    for session in sessions:
        start, end, ended = session_interval(session)
        billed = billed_seconds(session)
        price, why = hourly_price(session, prices)
        if why:
            notes.append(why)
        row: dict[str, Any] = {
            "session_id": session.get("session_id"), "host": session.get("host"), "zone": session.get("zone"),
            "region": region_of(session.get("zone")), "machine_type": session.get("machine_type"),
            "gpus": _gpus_text(session), "provisioning_model": session.get("provisioning_model"),
            "started_at": start, "ended_at": end, "ended": ended, "end_reason": session.get("end_reason"),
            "billed_seconds": billed, "spot_per_hour": None, "on_demand_per_hour": None,
            "spot_cost": None, "on_demand_cost": None,
        }
        if price is not None and billed is not None:
            row.update({
                "spot_per_hour": price["spot"], "on_demand_per_hour": price["on_demand"],
                "spot_cost": billed / 3600.0 * price["spot"],
                "on_demand_cost": billed / 3600.0 * price["on_demand"],
            })
        rows.append(row)

    priced = [r for r in rows if r["spot_cost"] is not None]
    totals: dict[str, Any] = {
        "sessions": len(rows), "priced_sessions": len(priced),
        "billed_seconds": sum(r["billed_seconds"] or 0.0 for r in rows),
        "priced_billed_seconds": sum(r["billed_seconds"] for r in priced),
        "spot_cost": None, "on_demand_cost": None, "saving": None, "saving_percent": None,
    }
    if priced:
        spot = sum(r["spot_cost"] for r in priced)
        on_demand = sum(r["on_demand_cost"] for r in priced)
        totals.update({"spot_cost": spot, "on_demand_cost": on_demand, "saving": on_demand - spot,
                       "saving_percent": 100.0 * (on_demand - spot) / on_demand if on_demand else None})
        if len(priced) < len(rows):
            notes.append(f"totals cover the {len(priced)} priced of {len(rows)} sessions")

    interruptions = _interruptions(sessions, commits, notes)
    net: dict[str, Any] = {"on_demand_useful_cost": None, "spot_cost": totals["spot_cost"],
                           "net_saving": None, "net_saving_percent": None}
    if priced and totals["priced_billed_seconds"] > 0:
        # Waste is counted over all sessions; scale it to the priced share of billed time.
        share = totals["priced_billed_seconds"] / totals["billed_seconds"] if totals["billed_seconds"] else 1.0
        useful = max(totals["priced_billed_seconds"] - interruptions["wasted_seconds"] * share, 0.0)
        on_demand_per_second = totals["on_demand_cost"] / totals["priced_billed_seconds"]
        on_demand_useful = useful * on_demand_per_second
        net_saving = on_demand_useful - totals["spot_cost"]
        net.update({"on_demand_useful_cost": on_demand_useful, "net_saving": net_saving,
                    "net_saving_percent": 100.0 * net_saving / on_demand_useful if on_demand_useful else None})
        spot_per_second = totals["spot_cost"] / totals["priced_billed_seconds"]
        interruptions["wasted_spot_cost"] = interruptions["wasted_seconds"] * share * spot_per_second
    return {"rows": rows, "totals": totals, "interruptions": interruptions, "net": net,
            "notes": notes, "sources": list(prices.get("sources", []))}


def _interruptions(sessions: list[dict[str, Any]], commits: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    down = 0.0
    for before, after in zip(sessions, sessions[1:]):
        _start, end, _ended = session_interval(before)
        start = _number(after.get("started_at"))
        if end is not None and start is not None and start > end:
            down += start - end

    restart = 0.0
    for session in sessions[1:]:
        starts = session.get("trainer_starts") or []
        first = _number(starts[0].get("first_step_at")) if starts else None
        began = _number(session.get("started_at"))
        if first is not None and began is not None and first > began:
            restart += first - began

    stop = 0.0
    for session in sessions:
        notices = [_number(n.get("time")) for n in session.get("notices") or []]
        notices = [t for t in notices if t is not None]
        ended = _number(session.get("ended_at"))
        if notices and ended is not None and session.get("end_reason") in INTERRUPTED_REASONS:
            stop += max(ended - min(notices), 0.0)

    lost = sum(int(s.get("lost_steps") or 0) for s in sessions)
    step_seconds = mean_step_seconds(sessions)
    recomputed = lost * step_seconds if step_seconds is not None else None
    if lost and step_seconds is None:
        notes.append(f"{lost} steps were recomputed but no throughput samples give a step time; "
                     "their cost is left out")

    stalls = [_number(c.get("snapshot_seconds")) for c in commits if c.get("reason") not in INTERRUPTED_REASONS]
    checkpoint = sum(s for s in stalls if s is not None)
    recorded = sum(len(s.get("checkpoints") or []) for s in sessions)
    if recorded > len(commits):
        notes.append(f"checkpoint stalls come from the {len(commits)} commit records still in the store "
                     f"({recorded} checkpoints were committed; retention deleted the rest): a lower bound")
    wasted = restart + stop + (recomputed or 0.0) + checkpoint
    return {
        "down_seconds": down, "restart_seconds": restart, "stop_seconds": stop, "lost_steps": lost,
        "mean_step_seconds": step_seconds, "recomputed_seconds": recomputed,
        "checkpoint_stall_seconds": checkpoint, "wasted_seconds": wasted, "wasted_spot_cost": None,
    }


def median_max(values: list[float]) -> tuple[float | None, float | None]:
    clean = [v for v in values if v is not None]
    if not clean:
        return None, None
    return statistics.median(clean), max(clean)
