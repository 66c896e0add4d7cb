"""Training throughput (img/s) of `spotrunner run` against the study's loop and a bare tensor loop.

All three train spotrunner.model.cifarnet with Adam and cross-entropy on CIFAR-shaped synthetic
data (spotrunner.data.synthetic): the real CIFAR-10 cannot be downloaded here. Images per second
are counted over a fixed number of training images after a warm-up; process start-up is
reported separately. When spotrunner falls short of 0.95x the bare loop, `breakdown` says where
its step time goes (a standalone loop calling the trainer's own functions, timed piece by piece,
and a cProfile of the same loop).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import BenchError, Run, cleanup, emit, parse_quick, run_args, summary  # noqa: E402

SEED = 0
LR = 1e-3


def _synthetic(size: int):
    from spotrunner.data import synthetic

    return synthetic(size, SEED)


def study_loop(images: int, warmup_batches: int = 50) -> dict[str, Any]:
    """The original study's loop: batch 4, PIL images through ToTensor+Normalize, DataLoader(2 workers)."""
    import numpy as np
    import torch
    import torchvision.transforms as transforms
    from PIL import Image

    from spotrunner.model import cifarnet

    data = _synthetic(max(images + warmup_batches * 4, 2000))
    hwc = data.train_images.permute(0, 2, 3, 1).contiguous().numpy()  # as torchvision's CIFAR10 holds it
    labels = data.train_labels.tolist()
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    class StudyDataset(torch.utils.data.Dataset):
        """What torchvision.datasets.CIFAR10 does per item: a PIL image through the transforms."""

        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, index: int):
            return transform(Image.fromarray(np.asarray(hwc[index]))), labels[index]

    torch.manual_seed(SEED)
    loader = torch.utils.data.DataLoader(StudyDataset(), batch_size=4, shuffle=True, num_workers=2)
    net = cifarnet()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    batches = images // 4
    running_loss = 0.0
    started = None
    counted = 0
    for index, (inputs, targets) in enumerate(loader):
        if index == warmup_batches:
            started = time.perf_counter()  # workers are up and prefetching: steady state
        optimizer.zero_grad()
        loss = criterion(net(inputs), targets)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        if started is not None:
            counted += inputs.shape[0]
            if counted >= batches * 4:
                break
    seconds = time.perf_counter() - started
    return {"img_per_s": round(counted / seconds, 1), "images": counted, "seconds": round(seconds, 3),
            "batch_size": 4, "num_workers": 2, "transforms": "PIL -> ToTensor -> Normalize"}


def bare_loop(images: int, batch_size: int = 128, warmup_steps: int = 10) -> dict[str, Any]:
    """uint8 tensors in memory, normalised per batch, no augmentation, no checkpoints."""
    import torch

    from spotrunner.data import MEAN, STD
    from spotrunner.model import cifarnet

    data = _synthetic(max(images, 10 * batch_size))
    torch.manual_seed(SEED)
    net = cifarnet()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    count = data.train_images.shape[0]
    steps = images // batch_size
    order = torch.randperm(count)
    running_loss = 0.0
    started = time.perf_counter()
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            started = time.perf_counter()
        position = step * batch_size % (count - batch_size + 1)
        idx = order[position:position + batch_size]
        inputs = (data.train_images[idx].float() - mean) / std
        loss = criterion(net(inputs), data.train_labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    seconds = time.perf_counter() - started
    return {"img_per_s": round(steps * batch_size / seconds, 1), "images": steps * batch_size,
            "seconds": round(seconds, 3), "batch_size": batch_size}


def spotrunner_run(size: int, epochs: int, interval: float, store: str) -> dict[str, Any]:
    """`spotrunner run` on a fresh run: img/s from training_started to the last epoch_completed."""
    run_id = f"tput-{int(interval)}s-{uuid.uuid4().hex[:6]}"
    args = run_args(store, run_id, synthetic_size=size, epochs=epochs, batch_size=128,
                    checkpoint_interval=interval, metadata="off", seed=SEED)
    with cleanup() as runs:
        run = Run(args)
        runs.append(run)
        worker = run.wait_event("worker_started", timeout=60)
        started = run.wait_event("training_started", timeout=120)
        code = run.wait_exit(timeout=600)
        if code != 0:
            raise BenchError(f"spotrunner run exited {code}:\n{run.output()}")
    epochs_done = run.find("epoch_completed")
    if len(epochs_done) != epochs:
        raise BenchError(f"expected {epochs} epoch_completed events, saw {len(epochs_done)}")
    seconds = epochs_done[-1]["_rx"] - started["_rx"]
    images = size * epochs
    periodic = [e for e in run.find("checkpoint_committed") if e.get("reason") == "periodic"]
    window_end = epochs_done[-1]["_rx"]
    return {
        "img_per_s": round(images / seconds, 1), "images": images, "seconds": round(seconds, 3),
        "checkpoint_interval_s": interval,
        "periodic_checkpoints_in_window": sum(1 for e in periodic if e["_rx"] <= window_end),
        "checkpoint_commit_seconds": summary([e["seconds"] for e in periodic]),
        "evaluations_in_window": epochs, "test_images_per_evaluation": max(100, size // 5),
        "startup": {
            "spawn_to_worker_started_s": round(worker["_rx"] - run.spawned_mono, 3),
            "worker_started_to_training_started_s": round(started["_rx"] - worker["_rx"], 3),
            "spawn_to_training_started_s": round(started["_rx"] - run.spawned_mono, 3),
        },
    }


def _trainer_parts(size: int, batch_size: int = 128):
    """A Trainer, dataset and transform built as spotrunner.trainer.train() builds them (CPU)."""
    from spotrunner import data as data_module
    from spotrunner.config import Config
    from spotrunner.trainer import Dist, StatusReporter, StopFlags, Trainer

    cfg = Config(dataset="synthetic", synthetic_size=size, batch_size=batch_size, seed=SEED, device="cpu")
    trainer = Trainer(cfg, Dist(), StatusReporter(None, 0), StopFlags())
    dataset = data_module.load(cfg.dataset, data_dir=cfg.data_dir, synthetic_size=size, seed=SEED).to(trainer.device)
    transform = data_module.BatchTransform(trainer.device, False)
    return cfg, trainer, dataset, transform


def breakdown(steps: int, size: int = 12800) -> dict[str, Any]:
    """Where one trainer step's time goes: train()'s step body, piece by piece, plus a cProfile."""
    from spotrunner import data as data_module

    cfg, trainer, dataset, transform = _trainer_parts(size)
    num = dataset.train_images.shape[0]
    per_epoch = data_module.steps_per_epoch(num, cfg.batch_size)
    order = data_module.epoch_order(num, cfg.seed, 0)
    parts = ["batch_indices+gather", "generator(seed,augment,...)", "augment (pad, crop gather, flip)",
             "normalise", "forward+loss", "zero_grad+backward", "optimizer.step", "float(loss)"]
    totals = dict.fromkeys(parts, 0.0)

    def step(position: int, timed: bool) -> None:
        marks = [time.perf_counter()]
        indices = data_module.batch_indices(order, position % per_epoch, cfg.batch_size)
        images = dataset.train_images[indices]
        labels = dataset.train_labels[indices]
        marks.append(time.perf_counter())
        gen = data_module.generator(cfg.seed, "augment", 0, position, 0)
        marks.append(time.perf_counter())
        augmented = transform.augment(images, gen)
        marks.append(time.perf_counter())
        inputs = transform.normalise(augmented)
        marks.append(time.perf_counter())
        with _autocast(trainer):
            loss = trainer.criterion(trainer.train_model(inputs).float(), labels)
        marks.append(time.perf_counter())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        trainer.optimizer.step()
        marks.append(time.perf_counter())
        float(loss.detach())
        marks.append(time.perf_counter())
        if timed:
            for name, start, end in zip(parts, marks, marks[1:]):
                totals[name] += end - start

    for position in range(10):
        step(position, False)
    started = time.perf_counter()
    for position in range(steps):
        step(position, True)
    wall = time.perf_counter() - started
    per_step_ms = {name: round(1000 * total / steps, 3) for name, total in totals.items()}
    step_ms = 1000 * wall / steps

    # The snapshot the manager takes on a periodic checkpoint (synchronous, in the loop).
    snap = []
    for _ in range(5):
        t0 = time.perf_counter()
        trainer.snapshot_state()
        snap.append(time.perf_counter() - t0)
    # One evaluation pass as train() runs it at each epoch end (counted in spotrunner's window).
    t0 = time.perf_counter()
    trainer.evaluate(dataset, transform)
    eval_seconds = time.perf_counter() - t0

    profiler = cProfile.Profile()
    profiler.enable()
    for position in range(min(steps, 150)):
        step(position, False)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    top = [line.rstrip() for line in text.getvalue().splitlines() if line.strip()][-15:]
    return {
        "steps": steps, "batch_size": cfg.batch_size, "step_ms": round(step_ms, 3),
        "img_per_s": round(cfg.batch_size / (step_ms / 1000), 1), "per_step_ms": per_step_ms,
        "augmentation_share": round((per_step_ms["generator(seed,augment,...)"]
                                     + per_step_ms["augment (pad, crop gather, flip)"]) / step_ms, 3),
        "snapshot_ms": summary([1000 * s for s in snap]),
        "evaluation_seconds_per_epoch": round(eval_seconds, 3),
        "test_images_per_evaluation": int(dataset.test_images.shape[0]),
        "cprofile_top_by_tottime": top,
    }



def _autocast(trainer):
    """The trainer's autocast context (named `autocast`, `_autocast` in older trees)."""
    method = getattr(trainer, "autocast", None) or getattr(trainer, "_autocast")
    return method()

def run(quick: bool = False) -> dict[str, Any]:
    """Throughput of the three loops, the ratios against the goals, and a step-time breakdown."""
    import torch

    study_images = 2000 if quick else 6000
    bare_images = 12800 if quick else 51200
    size, epochs = (12800, 2) if quick else (25600, 3)
    study = study_loop(study_images)
    bare = bare_loop(bare_images)
    with tempfile.TemporaryDirectory(prefix="bench-tput-") as store:
        # The 5 s interval's cost is measured in checkpoint_bench (overhead); here the default.
        runs = {"interval_60s": spotrunner_run(size, epochs, 60.0, store)}
    default = runs["interval_60s"]
    result: dict[str, Any] = {
        "data": "CIFAR-shaped synthetic (spotrunner.data.synthetic): the real CIFAR-10 cannot be downloaded here",
        "model": "cifarnet", "torch_threads": torch.get_num_threads(),
        "study_loop": study, "bare_loop": bare, "spotrunner": runs,
        "ratio_vs_study": round(default["img_per_s"] / study["img_per_s"], 2),
        "ratio_vs_bare": round(default["img_per_s"] / bare["img_per_s"], 3),
        "goals": {"ratio_vs_study": ">= 10", "ratio_vs_bare": ">= 0.95"},
    }
    result["breakdown"] = breakdown(150 if quick else 300)
    # The window includes one evaluation per epoch, which the bare loop does not do: show the
    # figure without it too, so the two costs (evaluation, per-step overhead) can be told apart.
    evals = result["breakdown"]["evaluation_seconds_per_epoch"] * epochs * (max(100, size // 5) /
                                                                            result["breakdown"]["test_images_per_evaluation"])
    train_only = default["images"] / max(1e-9, default["seconds"] - evals)
    result["spotrunner_excluding_evaluation_img_per_s"] = round(train_only, 1)
    result["ratio_vs_bare_excluding_evaluation"] = round(train_only / bare["img_per_s"], 3)
    result["goals_met"] = {"ratio_vs_study": result["ratio_vs_study"] >= 10,
                           "ratio_vs_bare": result["ratio_vs_bare"] >= 0.95}
    return result


if __name__ == "__main__":
    emit(run(quick=parse_quick()))
