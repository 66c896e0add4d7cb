"""The CUDA path end to end; skipped where no GPU is visible (CI here has none).

On a GPU, determinism is best effort (cudnn deterministic kernels, deterministic cuBLAS
workspace); these tests record whether a resumed run matches on the machine they ran on.
"""

from __future__ import annotations

import signal
import time

import pytest

from spotrunner import exitcodes
from tests.support.runs import run_args

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]

# Larger than the CPU reference run: a GPU trains that one in about a second.
GPU = ("--device", "cuda", "--batch-size", "128", "--synthetic-size", "20000", "--epochs", "12")


def test_trains_on_the_gpu_and_learns(spotrunner_proc, tmp_path):
    proc = spotrunner_proc(run_args(str(tmp_path), *GPU))
    assert proc.wait_exit(timeout=300) == exitcodes.OK, proc.output()
    assert proc.wait_event("training_started")["device"].startswith("cuda")
    assert proc.wait_event("training_completed")["test_accuracy"] > 0.5


def test_bf16_and_channels_last_train(spotrunner_proc, tmp_path):
    proc = spotrunner_proc(run_args(str(tmp_path), *GPU, "--amp", "--channels-last"))
    assert proc.wait_exit(timeout=300) == exitcodes.OK, proc.output()
    assert proc.wait_event("training_completed")["test_accuracy"] > 0.5


def test_killed_and_stopped_runs_on_the_gpu_match_the_uninterrupted_run(spotrunner_proc, tmp_path):
    reference = spotrunner_proc(run_args(str(tmp_path / "ref"), *GPU))
    assert reference.wait_exit(timeout=300) == exitcodes.OK, reference.output()
    digest = reference.wait_event("training_completed")["weights_sha256"]

    store = str(tmp_path / "interrupted")
    killed = spotrunner_proc(run_args(store, *GPU, interval="0.5"))
    killed.wait_event("checkpoint_committed", timeout=120)
    time.sleep(1.0)  # mid-run, a random instant
    killed.kill_group()
    stopped = spotrunner_proc(run_args(store, *GPU, interval="1000"))
    assert stopped.wait_event("training_started", timeout=120)["step"] > 0
    time.sleep(2.0)  # mid-run
    stopped.signal(signal.SIGTERM)
    assert stopped.wait_exit(timeout=60) == exitcodes.STOPPED, stopped.output()
    step = stopped.wait_event("checkpoint_committed", reason="signal")["step"]
    final = spotrunner_proc(run_args(store, *GPU))
    assert final.wait_exit(timeout=300) == exitcodes.OK, final.output()
    assert final.wait_event("training_started")["step"] == step
    assert final.wait_event("training_completed")["weights_sha256"] == digest
