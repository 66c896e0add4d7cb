"""Run every benchmark and write bench/out/results.json and bench/out/results.md.

    .venv/bin/python bench/run_all.py [--quick]

Each benchmark module exposes `run(quick: bool = False) -> dict`. One that fails is recorded
with its error and the others still run. The Markdown table sets every headline figure
against its goal and names the machine it ran on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, machine  # noqa: E402

OUT_DIR = os.path.join(REPO, "bench", "out")
# gpu.py's result from a lent NVIDIA H200 (bench/gpu_session.sh), reported where no GPU is present.
DEVICE_GPU_JSON = os.path.join(REPO, "bench", "gpu-h200.json")
ORDER = ["throughput", "checkpoint_bench", "notice_latency", "restart", "goodput", "gpu"]


def other_cpu_load(seconds: float = 1.0) -> float:
    """Busy fraction of all CPUs over `seconds` while this process sleeps: load from other work."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return round((busy1 - busy0) / max(1, total1 - total0), 3)


def run_one(name: str, quick: bool, results: dict[str, Any]) -> dict[str, Any]:
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{name}":
            return {"skipped": f"bench/{name}.py is absent"}
        raise
    kwargs: dict[str, Any] = {"quick": quick}
    if name == "goodput":
        study = results.get("throughput", {}).get("study_loop", {}).get("img_per_s")
        if study:
            kwargs["study_img_per_s"] = study
    return module.run(**kwargs)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text}{unit}"


def _met(flag: Any) -> str:
    return "n/a" if flag is None else ("yes" if flag else "**no**")


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, goal, met) rows for the Markdown table."""
    rows: list[tuple[str, str, str, str]] = []
    t = results.get("throughput") or {}
    if "study_loop" in t:
        sr = t["spotrunner"]
        interval = f"checkpoints every {sr['checkpoint_interval_s']:g} s"
        rows += [
            ("Study loop (batch 4, PIL, 2 workers)", _fmt(t["study_loop"]["img_per_s"], " img/s"), "~750 reference", ""),
            (f"Bare tensor loop (batch 128), median of {t['rounds']} rounds", _fmt(t["bare_loop"]["img_per_s"], " img/s"),
             "~8,500 reference", ""),
            (f"spotrunner run, batch 128, {interval}, training (evaluation passes left out)",
             _fmt(sr["img_per_s"], " img/s"), "", ""),
            (f"spotrunner run, batch 128, {interval}, end to end (with evaluation)",
             _fmt(sr["end_to_end_img_per_s"], " img/s"), "", ""),
            ("spotrunner / study loop", _fmt(t["ratio_vs_study"], "x"), ">= 10x", _met(t["ratio_vs_study"] >= 10)),
            ("spotrunner / bare loop, training", _fmt(t["ratio_vs_bare"], "x"), ">= 0.95x", _met(t["ratio_vs_bare"] >= 0.95)),
            ("spotrunner / bare loop, each round", ", ".join(f"{r:.2f}" for r in t["ratio_vs_bare_per_round"]),
             "(noise)", ""),
            (f"Trainer step vs bare step, alternating in one process ({t['steps_interleaved']['steps_each']} each)",
             f"{_fmt(t['steps_interleaved']['trainer_step_ms'], ' ms')} vs {_fmt(t['steps_interleaved']['bare_step_ms'], ' ms')}"
             f" ({_fmt(t['steps_interleaved']['ratio'], 'x')} the speed)", "(diagnostic)", ""),
            ("spotrunner / bare loop, end to end with evaluation", _fmt(t["ratio_vs_bare_end_to_end"], "x"),
             "(diagnostic)", ""),
            ("Trainer step: gather + crop + flip (one index op), share of step time",
             _fmt(100 * t["breakdown"]["gather_crop_flip_share"], " %"),
             "(diagnostic)", ""),
            ("spotrunner start-up (spawn -> training_started)",
             _fmt(sr["rounds"][0]["startup"]["spawn_to_training_started_s"], " s"), "(reported apart)", ""),
        ]
    elif t:
        rows.append(("Throughput", t.get("error") or t.get("skipped", "?"), "", ""))
    c = results.get("checkpoint_bench") or {}
    if c:
        if "skipped" in c or "error" in c:
            rows.append(("Checkpoint benchmark", c.get("skipped") or c.get("error", "")[:120], "", ""))
        else:
            o = c["overhead"]
            rows.append(("Checkpoint overhead every 5 s, bound from commit records (snapshot + persist / 5 s)",
                         _fmt(o["overhead_bound_percent"], " %"), "<= 1 %", _met(o["overhead_bound_percent"] <= 1.0)))
            rows.append((f"Checkpoint overhead every 5 s, whole-run timing ({o['no_checkpoint_seconds']['n']} pairs)",
                         f"{_fmt(o['overhead_percent'], ' %')} (run-to-run noise {_fmt(o['run_to_run_noise_percent'], ' %')})",
                         "(diagnostic)", ""))
            for key, label in (("emergency_direct", "save_now"), ("emergency_end_to_end", "SIGTERM -> committed")):
                for size, name in (("cnn", "CNN"), ("state_100mb", "100 MB state")):
                    entry = c[key].get(size)
                    if entry:
                        rows.append((f"Emergency commit on the GCS emulator, {name} ({label}, {entry['n']} trials)",
                                     f"median {_fmt(entry['median'], ' s')}, max {_fmt(entry['max'], ' s')}",
                                     f"<= {entry['goal_seconds']:g} s", _met(entry["max"] <= entry["goal_seconds"])))
    n = results.get("notice_latency") or {}
    for store in ("local", "gcs_emulator"):
        if store in n:
            entry = n[store]
            for figure, key in (("notice -> committed", "notice_to_committed_s"), ("notice -> exit 75", "notice_to_exit_s")):
                s = entry[key]
                rows.append((f"{figure}, {store.replace('_', ' ')} store ({entry['trials']} trials)",
                             f"median {_fmt(s['median'], ' s')}, max {_fmt(s['max'], ' s')}",
                             "median <= 1 s, max <= 3 s", _met(s["median"] <= 1.0 and s["max"] <= 3.0)))
    if n and "local" not in n:
        rows.append(("Notice latency", n.get("error", "?")[:120], "", ""))
    r = results.get("restart") or {}
    if "spawn_to_first_step_s" in r:
        rows.append((f"Restart: process start -> first step ({r['trials']} resumes)",
                     f"median {_fmt(r['spawn_to_first_step_s']['median'], ' s')}", "", ""))
        rows.append(("Restart: worker_started -> first step",
                     f"median {_fmt(r['worker_started_to_first_step_s']['median'], ' s')}", "", ""))
    elif r:
        rows.append(("Restart", r.get("error", "?")[:120], "", ""))
    g = results.get("goodput") or {}
    for label, entry in (g.get("schedules") or {}).items():
        sp, st = entry["spotrunner"], entry["study"]
        period = sp["period_s"]
        goal = ">= 98 %" if period == 60 else ""
        rows.append((f"Goodput, preemption {label.replace('_', ' ')} ({sp['cycles']} preemptions)",
                     _fmt(100 * sp["goodput"], " %"), goal, _met(sp["goodput"] >= 0.98) if goal else ""))
        rows.append((f"Goodput {label.replace('_', ' ')}, process start-up excluded",
                     _fmt(100 * sp["goodput_excluding_startup"], " %"), "(diagnostic)", ""))
        rows.append((f"Lost steps {label.replace('_', ' ')} (with notice)", _fmt(sp["lost_steps"]), "0",
                     _met(sp["lost_steps"] == 0)))
        rows.append((f"Study approach {label.replace('_', ' ')} (computed, CIFAR-10 epoch)",
                     f"{_fmt(100 * st['goodput'], ' %')} goodput, {st['lost_steps_per_preemption']} steps lost "
                     "per preemption", "", ""))
    if g and "schedules" not in g:
        rows.append(("Goodput", g.get("error", "?")[:120], "", ""))
    gpu = results.get("gpu") or {}
    if "rows" in gpu:
        where = f"{gpu['gpu']}" + (" (separate device run)" if gpu.get("from_device_run") else "")
        for row in gpu["rows"]:
            name = (f"GPU {where}: batch {row['batch_size']}, bf16 {'on' if row['bf16_autocast'] else 'off'}, "
                    f"channels-last {'on' if row['channels_last'] else 'off'}"
                    + ("" if row["sync_each_step"] else ", no per-step loss sync"))
            rows.append((name, f"{_fmt(row['img_per_s'], ' img/s')}, {_fmt(row['step_ms'], ' ms')}/step, "
                               f"snapshot stall {_fmt(row['snapshot_stall_ms']['median'], ' ms')}", "", ""))
    elif gpu:
        rows.append(("GPU", gpu.get("skipped") or gpu.get("error", "?")[:120], "", ""))
    return rows


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# spotrunner benchmark results", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB memory, torch {m['torch']}, "
        f"Python {m['python']}, {m['date']}. Mode: {'quick' if report['quick'] else 'full'}; "
        f"suite runtime {report['total_seconds']:.0f} s. CPU busy with other work when the suite started: "
        f"{100 * report['other_cpu_load_before']:.0f} %.", "",
        "Data: CIFAR-shaped synthetic (the real CIFAR-10 cannot be downloaded here). Model: cifarnet.", "",
        "| figure | value | goal | met |", "| --- | --- | --- | --- |",
    ]
    for figure, value, goal, met in table_rows(report["results"]):
        lines.append(f"| {figure} | {value} | {goal} | {met} |")
    lines += ["", "Seconds per benchmark: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials and shorter runs")
    parser.add_argument("--only", nargs="*", choices=ORDER, help="run only these benchmarks")
    args = parser.parse_args(argv)
    os.makedirs(OUT_DIR, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {"quick": args.quick, "machine": machine(), "other_cpu_load_before": other_cpu_load(),
                              "results": {}, "seconds": {}}
    for name in args.only or ORDER:
        t0 = time.monotonic()
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        try:
            result = run_one(name, args.quick, report["results"])
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            result = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        if name == "gpu" and "skipped" in result and os.path.exists(DEVICE_GPU_JSON):
            with open(DEVICE_GPU_JSON) as handle:
                result = {**json.load(handle), "from_device_run": True, "here": result["skipped"]}
        report["results"][name] = result
        report["seconds"][name] = round(time.monotonic() - t0, 1)
        print(f"[run_all] {name} done in {report['seconds'][name]:.0f} s", file=sys.stderr, flush=True)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    report["other_cpu_load_after"] = other_cpu_load()
    json_path = os.path.join(OUT_DIR, "results.json")
    md_path = os.path.join(OUT_DIR, "results.md")
    with open(json_path, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    with open(md_path, "w") as handle:
        handle.write(markdown(report))
    print(md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
