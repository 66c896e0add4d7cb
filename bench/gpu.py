"""The trainer's loop on a CUDA GPU: img/s and step time, bf16 autocast and channels-last on/off.

Runs only when torch.cuda.is_available(). Builds spotrunner.trainer.Trainer directly (as
train() does: Config, Dist, StatusReporter, StopFlags), puts the synthetic dataset on the GPU
and runs train()'s step body: batch indices, gather+crop+flip (one index op), normalise, forward
under the trainer's autocast, backward, Adam step, and the per-step `float(loss)` train() does
for its running loss (a device sync each step; the `no_sync` rows leave it out to show its
cost). The snapshot stall is Trainer.snapshot_state() on the GPU model: the synchronous part of
every checkpoint.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, parse_quick, summary  # noqa: E402


def _parts(batch_size: int, amp: bool, channels_last: bool, size: int):
    from spotrunner import data as data_module
    from spotrunner.config import Config
    from spotrunner.trainer import Dist, StatusReporter, StopFlags, Trainer

    cfg = Config(dataset="synthetic", synthetic_size=size, batch_size=batch_size, seed=0, device="cuda",
                 amp=amp, channels_last=channels_last)
    trainer = Trainer(cfg, Dist(), StatusReporter(None, 0), StopFlags())
    dataset = data_module.load("synthetic", data_dir=cfg.data_dir, synthetic_size=size, seed=0).to(trainer.device)
    transform = data_module.BatchTransform(trainer.device, cfg.channels_last)
    train_set = data_module.AugmentedTrainSet(dataset.train_images, dataset.train_labels)
    return cfg, trainer, train_set, transform


def measure(batch_size: int, amp: bool, channels_last: bool, steps: int, sync_each_step: bool = True,
            size: int = 50000) -> dict[str, Any]:
    """img/s and ms per step of train()'s step body on the GPU, plus the snapshot stall."""
    import torch

    from spotrunner import data as data_module

    cfg, trainer, train_set, transform = _parts(batch_size, amp, channels_last, size)
    num = len(train_set)
    per_epoch = data_module.steps_per_epoch(num, batch_size)
    order = data_module.epoch_order(num, cfg.seed, 0)

    def step(position: int) -> None:
        loss = trainer.train_step(train_set, transform, order, 0, position % per_epoch)
        if sync_each_step:
            float(loss.detach())  # what the loop did per step before the loss stayed on the device

    for position in range(30):
        step(position)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for position in range(steps):
        step(position)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    stalls = []
    for _ in range(10):
        t0 = time.perf_counter()
        trainer.snapshot_state()
        stalls.append(1000 * (time.perf_counter() - t0))
    return {"batch_size": batch_size, "bf16_autocast": amp, "channels_last": channels_last,
            "sync_each_step": sync_each_step, "img_per_s": round(steps * batch_size / seconds, 1),
            "step_ms": round(1000 * seconds / steps, 3), "snapshot_stall_ms": summary(stalls)}




def run(quick: bool = False) -> dict[str, Any]:
    """Every (batch, autocast, channels-last) combination; {"skipped": ...} without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    steps = 100 if quick else 300
    rows = []
    for batch_size in (128, 512):
        for amp in (False, True):
            for channels_last in (False, True):
                rows.append(measure(batch_size, amp, channels_last, steps))
    for batch_size in (128, 512):
        rows.append(measure(batch_size, True, True, steps, sync_each_step=False))
    best = max(rows, key=lambda row: row["img_per_s"])
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "steps_per_row": steps, "dataset": "synthetic, 50,000 images, on the GPU",
            "rows": rows, "best": {k: best[k] for k in ("batch_size", "bf16_autocast", "channels_last",
                                                        "sync_each_step", "img_per_s", "step_ms")}}


if __name__ == "__main__":
    emit(run(quick=parse_quick()))
