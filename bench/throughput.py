"""Training throughput (img/s) of `spotrunner run` against the study's loop and a bare tensor loop.

All three train spotrunner.model.cifarnet with Adam and cross-entropy on CIFAR-shaped synthetic
data (spotrunner.data.synthetic): the real CIFAR-10 cannot be downloaded here. Images per second
are counted over a fixed number of training images after a warm-up; process start-up is
reported separately. spotrunner's training figure leaves out the evaluation pass it runs at
every epoch end (the bare loop has none; the trainer times each pass); its end-to-end figure
keeps it. Both keep augmentation and periodic checkpoints. `breakdown` says where a trainer
step's time goes (a standalone loop calling the trainer's own functions, timed piece by piece,
and a cProfile of the same loop).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics
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


def bare_step(data: Any, batch_size: int = 128) -> Any:
    """One step of the bare loop as a function of the step number: uint8 tensors in memory,
    normalised per batch, no augmentation, no evaluation, no checkpoints."""
    import torch

    from spotrunner.data import MEAN, STD
    from spotrunner.model import cifarnet

    torch.manual_seed(SEED)
    net = cifarnet()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    count = data.train_images.shape[0]
    order = torch.randperm(count)
    running_loss = [0.0]

    def step(number: int) -> None:
        position = number * batch_size % (count - batch_size + 1)
        idx = order[position:position + batch_size]
        inputs = (data.train_images[idx].float() - mean) / std
        loss = criterion(net(inputs), data.train_labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running_loss[0] += loss.item()

    return step


def bare_loop(images: int, batch_size: int = 128, warmup_steps: int = 10) -> dict[str, Any]:
    """The bare loop's img/s over `images` training images after `warmup_steps`."""
    step = bare_step(_synthetic(max(images, 10 * batch_size)), batch_size)
    steps = images // batch_size
    for number in range(warmup_steps):
        step(number)
    started = time.perf_counter()
    for number in range(warmup_steps, warmup_steps + steps):
        step(number)
    seconds = time.perf_counter() - started
    return {"img_per_s": round(steps * batch_size / seconds, 1), "images": steps * batch_size,
            "seconds": round(seconds, 3), "batch_size": batch_size}


def steps_interleaved(steps: int, size: int = 25600) -> dict[str, Any]:
    """The trainer's step against the bare loop's step, alternating in one process.

    Alternating step by step (ABBA) puts both under the same machine noise, which moves
    whole-run figures by 10-30 % here: this isolates what spotrunner's step adds (the
    crop and flip, its normalisation, the running loss kept on the device).
    """
    from spotrunner import data as data_module

    cfg, trainer, dataset, train_set, transform = _trainer_parts(size)
    order = data_module.epoch_order(size, cfg.seed, 0)
    per_epoch = data_module.steps_per_epoch(size, cfg.batch_size)
    bare = bare_step(dataset, cfg.batch_size)

    def trainer_step(number: int) -> None:
        loss = trainer.train_step(train_set, transform, order, 0, number % per_epoch)
        trainer.loss_total += loss.detach()

    timed = {"bare": 0.0, "trainer": 0.0}
    for number in range(10):
        bare(number)
        trainer_step(number)
    for number in range(10, 10 + steps):
        pair = (("bare", bare), ("trainer", trainer_step))
        for name, step in pair if number % 2 else reversed(pair):
            started = time.perf_counter()
            step(number)
            timed[name] += time.perf_counter() - started
    return {"steps_each": steps, "batch_size": cfg.batch_size,
            "bare_step_ms": round(1000 * timed["bare"] / steps, 3),
            "trainer_step_ms": round(1000 * timed["trainer"] / steps, 3),
            "ratio": round(timed["bare"] / timed["trainer"], 3)}


def spotrunner_run(size: int, epochs: int, interval: float, store: str) -> dict[str, Any]:
    """`spotrunner run` on a fresh run, timed from training_started to the last epoch_completed.

    Two figures: end to end (the whole window) and training (the window less the evaluation
    passes, timed by the trainer and logged as `evaluation_seconds` on each epoch_completed).
    Periodic checkpoints stay in both.
    """
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
    evaluation = sum(e["evaluation_seconds"] for e in epochs_done)
    images = size * epochs
    periodic = [e for e in run.find("checkpoint_committed") if e.get("reason") == "periodic"]
    window_end = epochs_done[-1]["_rx"]
    return {
        "img_per_s": round(images / (seconds - evaluation), 1),
        "end_to_end_img_per_s": round(images / seconds, 1),
        "images": images, "seconds": round(seconds, 3), "evaluation_seconds": round(evaluation, 3),
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
    """A Trainer, dataset, train set and transform built as spotrunner.trainer.train() builds them (CPU)."""
    from spotrunner import data as data_module
    from spotrunner.config import Config
    from spotrunner.trainer import Dist, StatusReporter, StopFlags, Trainer

    cfg = Config(dataset="synthetic", synthetic_size=size, batch_size=batch_size, seed=SEED, device="cpu")
    trainer = Trainer(cfg, Dist(), StatusReporter(None, 0), StopFlags())
    dataset = data_module.load(cfg.dataset, data_dir=cfg.data_dir, synthetic_size=size, seed=SEED).to(trainer.device)
    transform = data_module.BatchTransform(trainer.device, False)
    train_set = data_module.AugmentedTrainSet(dataset.train_images, dataset.train_labels)
    return cfg, trainer, dataset, train_set, transform


def breakdown(steps: int, size: int = 12800) -> dict[str, Any]:
    """Where one trainer step's time goes: train_step's body, piece by piece, plus a cProfile."""
    from spotrunner import data as data_module

    cfg, trainer, dataset, train_set, transform = _trainer_parts(size)
    num = len(train_set)
    per_epoch = data_module.steps_per_epoch(num, cfg.batch_size)
    order = data_module.epoch_order(num, cfg.seed, 0)
    parts = ["batch_indices", "generator(seed,augment,...)", "gather+crop+flip (one index op)",
             "normalise", "forward+loss", "zero_grad+backward", "optimizer.step", "float(loss)"]
    totals = dict.fromkeys(parts, 0.0)

    def step(position: int, timed: bool) -> None:
        marks = [time.perf_counter()]
        indices = data_module.batch_indices(order, position % per_epoch, cfg.batch_size)
        marks.append(time.perf_counter())
        gen = data_module.generator(cfg.seed, "augment", 0, position, 0)
        marks.append(time.perf_counter())
        images, labels = train_set.batch(indices, gen)
        marks.append(time.perf_counter())
        inputs = transform.normalise(images)
        marks.append(time.perf_counter())
        with trainer.autocast():
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
    # One evaluation pass as train() runs it at each epoch end.
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
        "gather_crop_flip_share": round((per_step_ms["generator(seed,augment,...)"]
                                     + per_step_ms["gather+crop+flip (one index op)"]) / step_ms, 3),
        "snapshot_ms": summary([1000 * s for s in snap]),
        "evaluation_seconds_per_epoch": round(eval_seconds, 3),
        "test_images_per_evaluation": int(dataset.test_images.shape[0]),
        "cprofile_top_by_tottime": top,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Throughput of the three loops, the ratios against the goals, and where a step's time goes.

    On 2 shared cores one loop's speed moves by 10-30 % from minute to minute, so the bare
    loop and `spotrunner run` alternate for several rounds (ABBA order, so neither always
    runs first) and the goal ratio compares their medians; each round's own ratio is listed
    too, and `steps_interleaved` compares the two steps alternating in one process.
    """
    import torch

    study_images = 2000 if quick else 6000
    bare_images = 12800 if quick else 25600
    size, epochs = (12800, 2) if quick else (25600, 2)
    rounds = 2 if quick else 6
    interval = 5.0  # 12 times the default (60 s): at least one periodic checkpoint per window
    study = study_loop(study_images)
    bare_runs: list[dict[str, Any]] = []
    spotrunner_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-tput-") as store:
        for number in range(rounds):
            order = ["bare", "spotrunner"] if number % 2 == 0 else ["spotrunner", "bare"]
            for loop in order:
                if loop == "bare":
                    bare_runs.append(bare_loop(bare_images))
                else:
                    spotrunner_runs.append(spotrunner_run(size, epochs, interval, store))
    bare = statistics.median([b["img_per_s"] for b in bare_runs])
    training = statistics.median([s["img_per_s"] for s in spotrunner_runs])
    end_to_end = statistics.median([s["end_to_end_img_per_s"] for s in spotrunner_runs])
    per_round = [round(s["img_per_s"] / b["img_per_s"], 3) for b, s in zip(bare_runs, spotrunner_runs)]
    result: dict[str, Any] = {
        "data": "CIFAR-shaped synthetic (spotrunner.data.synthetic): the real CIFAR-10 cannot be downloaded here",
        "model": "cifarnet", "torch_threads": torch.get_num_threads(), "rounds": rounds,
        "study_loop": study,
        "bare_loop": {"img_per_s": round(bare, 1), "rounds": bare_runs},
        "spotrunner": {"img_per_s": round(training, 1), "end_to_end_img_per_s": round(end_to_end, 1),
                       "checkpoint_interval_s": interval, "rounds": spotrunner_runs},
        "ratio_vs_study": round(training / study["img_per_s"], 2),
        "ratio_vs_bare": round(training / bare, 3),
        "ratio_vs_bare_per_round": per_round,
        "ratio_vs_bare_median_of_rounds": round(statistics.median(per_round), 3),
        "ratio_vs_bare_end_to_end": round(end_to_end / bare, 3),
        "goals": {"ratio_vs_study": ">= 10",
                  "ratio_vs_bare": ">= 0.95 (training img/s, periodic checkpoints on, medians of the rounds)"},
    }
    result["goals_met"] = {"ratio_vs_study": result["ratio_vs_study"] >= 10,
                           "ratio_vs_bare": result["ratio_vs_bare"] >= 0.95}
    result["steps_interleaved"] = steps_interleaved(100 if quick else 300)
    result["breakdown"] = breakdown(150 if quick else 300)
    return result


if __name__ == "__main__":
    emit(run(quick=parse_quick()))
