"""The trainer worker: the training loop, its checkpoints, and its part of a clean stop.

Started by the supervisor (`python -m spotrunner.trainer`, or under torchrun), configured
through the `_SPOTRUNNER_CONFIG` environment variable. Signal handlers only set flags:

    SIGUSR1  preemption notice: checkpoint (reason preemption) and stop
    SIGTERM  stop request:      checkpoint (reason signal) and stop
    SIGINT   the same; a second SIGINT aborts at once
    SIGUSR2  early notice:      checkpoint now and keep training

The loop checks the flags between steps. Under torchrun the flags are combined across
ranks every step (one small all-reduce), so every rank stops after the same step; rank 0
commits and the others wait for the commit before exiting.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from spotrunner import exitcodes, history
from spotrunner.config import Config
from spotrunner.errors import ConfigError, SpotrunnerError
from spotrunner.logs import clear_status_line, configure, get_logger, set_status_line

log = get_logger()

CONFIG_ENV = "_SPOTRUNNER_CONFIG"
STATUS_SOCKET_ENV = "_SPOTRUNNER_STATUS_SOCKET"
SESSION_ENV = "_SPOTRUNNER_SESSION_ID"
PARENT_ENV = "_SPOTRUNNER_PARENT_PID"
STOP_MARGIN = 1.5  # seconds of the stop deadline kept for exiting and the supervisor
# Test images per forward pass in evaluation: on 2 CPU cores 512 beat 128, 1000 and 2560 by
# 10-30 % (larger batches spill the caches).
EVAL_BATCH = 512


# --- signals ----------------------------------------------------------------------------


@dataclass
class StopFlags:
    """Set by signal handlers, read by the loop between steps. Handlers do nothing else."""

    stop_reason: str | None = None  # "preemption" | "signal"
    stop_requested_at: float | None = None
    checkpoint_now: bool = False
    interrupts: int = 0

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_stop)
        signal.signal(signal.SIGUSR2, self._on_checkpoint_now)
        signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_stop(self, signum: int, _frame: Any) -> None:
        reason = "preemption" if signum == signal.SIGUSR1 else "signal"
        if self.stop_reason is None or reason == "preemption":
            self.stop_reason = reason
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()

    def _on_checkpoint_now(self, _signum: int, _frame: Any) -> None:
        self.checkpoint_now = True

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        self.interrupts += 1
        if self.interrupts > 1:
            os._exit(exitcodes.ABORTED)  # a second Ctrl-C means now, checkpoint or not
        self._on_stop(signum, frame)


def die_with_supervisor() -> None:
    """Die with our parent: the supervisor, or torchrun (which itself dies with the supervisor)."""
    from spotrunner.orphan_guard import die_with_parent

    expected = os.environ.get(PARENT_ENV)
    parent = int(expected) if expected and os.environ.get("LOCAL_RANK") is None else os.getppid()
    if not die_with_parent(parent):
        os._exit(exitcodes.FAILURE)  # the parent died before prctl took effect


# --- reporting to the supervisor --------------------------------------------------------


class StatusReporter:
    """JSON datagrams to the supervisor's status socket; never blocks, never raises."""

    def __init__(self, address: str | None, rank: int):
        self.rank = rank
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)

    def send(self, kind: str, **fields: Any) -> None:
        if self.sock is None:
            return
        message = json.dumps({"type": kind, "rank": self.rank, "pid": os.getpid(), "time": time.time(), **fields})
        try:
            self.sock.sendto(message.encode(), self.address)
        except OSError:
            pass  # the supervisor is gone or busy; progress reports are best effort


# --- distributed --------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


# --- the training state -------------------------------------------------------------------


@dataclass
class Progress:
    """Where training is: what a checkpoint must hold besides the weights."""

    epoch: int = 0
    samples_in_epoch: int = 0  # samples of the current epoch already trained on (all ranks)
    step: int = 0
    loss_count: int = 0  # steps in this epoch so far; their summed loss is Trainer.loss_total
    metrics: list[dict[str, Any]] = field(default_factory=list)


def run_identity(cfg: Config) -> dict[str, Any]:
    """Settings a run cannot change across restarts without changing what it computes."""
    return {"model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "synthetic_size": cfg.synthetic_size if cfg.dataset == "synthetic" else None, "lr": cfg.lr}


def check_identity(saved: dict[str, Any], cfg: Config) -> None:
    current = run_identity(cfg)
    for name, value in current.items():
        if saved.get(name) != value:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag}={value!r} differs from the run's checkpoints ({saved.get(name)!r}); "
                f"start a new --run-id or pass {flag} {saved.get(name)}"
            )


class Trainer:
    def __init__(self, cfg: Config, dist_info: Dist, reporter: StatusReporter, flags: StopFlags):
        import torch

        self.torch = torch
        self.cfg = cfg
        self.dist = dist_info
        self.reporter = reporter
        self.flags = flags
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = self._pick_device()
        torch.manual_seed(cfg.seed)
        from spotrunner.model import build_model

        model = build_model(cfg.model).to(self.device)
        if cfg.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.train_model = model
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=device_ids)
        self.progress = Progress()
        # Summed on the device so no step waits for a GPU sync; read when reporting or saving.
        self.loss_total = torch.zeros((), dtype=torch.float64, device=self.device)

    def _pick_device(self) -> Any:
        torch = self.torch
        wanted = self.cfg.device
        if wanted == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible; use --device auto or cpu")
        if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        return torch.device("cuda", self.dist.local_rank)

    # --- state <-> checkpoint ---

    def snapshot_state(self) -> dict[str, Any]:
        """Everything needed to rebuild this exact point, copied to CPU memory."""
        torch = self.torch

        def to_cpu(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if value.device.type == "cpu":
                    return value.detach().clone()
                pinned = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                return pinned.copy_(value.detach(), non_blocking=True)
            if isinstance(value, dict):
                return {key: to_cpu(item) for key, item in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(to_cpu(item) for item in value)
            return value

        state = {
            "format": 1,
            "identity": run_identity(self.cfg),
            "world_size": self.dist.world_size,
            "model": to_cpu(self.model.state_dict()),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "progress": {
                "epoch": self.progress.epoch,
                "samples_in_epoch": self.progress.samples_in_epoch,
                "step": self.progress.step,
                "loss_sum": float(self.loss_total),
                "loss_count": self.progress.loss_count,
                "metrics": list(self.progress.metrics),
            },
        }
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        check_identity(state["identity"], self.cfg)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved = state["progress"]
        self.progress = Progress(saved["epoch"], saved["samples_in_epoch"], saved["step"], saved["loss_count"],
                                 list(saved["metrics"]))
        self.loss_total.fill_(saved["loss_sum"])

    # --- training ---

    def evaluate(self, data: Any, transform: Any) -> tuple[float, float]:
        """(test loss, test accuracy) of the current weights; the weights are not touched."""
        torch = self.torch
        self.model.eval()
        total_loss, correct = 0.0, 0
        count = data.test_images.shape[0]
        with torch.inference_mode(), self.autocast():
            for start in range(0, count, EVAL_BATCH):
                images = transform.normalise(data.test_images[start:start + EVAL_BATCH])
                labels = data.test_labels[start:start + EVAL_BATCH]
                logits = self.model(images)
                total_loss += float(self.criterion(logits.float(), labels)) * labels.shape[0]
                correct += int((logits.argmax(1) == labels).sum())
        self.model.train()
        return total_loss / count, correct / count

    def mean_loss(self) -> float:
        """Mean training loss of this epoch so far (one device sync)."""
        return float(self.loss_total) / max(1, self.progress.loss_count)

    def train_step(self, train_set: Any, transform: Any, order: Any, epoch: int, position: int) -> Any:
        """One optimisation step on this rank's share of global batch `position`; returns the loss."""
        from spotrunner import data as data_module

        cfg, dist_info = self.cfg, self.dist
        indices = data_module.batch_indices(order, position, cfg.batch_size, dist_info.rank,
                                            dist_info.world_size).to(self.device)
        gen = data_module.generator(cfg.seed, "augment", epoch, position, dist_info.rank)
        images, labels = train_set.batch(indices, gen)
        inputs = transform.normalise(images)
        with self.autocast():
            loss = self.criterion(self.train_model(inputs).float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def autocast(self) -> Any:
        import contextlib

        if self.cfg.amp and self.device.type == "cuda":
            return self.torch.autocast("cuda", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def stop_signal(self) -> tuple[str | None, bool]:
        """(stop reason, checkpoint-now) agreed by every rank: one tiny all-reduce per step."""
        reason, now = self.flags.stop_reason, self.flags.checkpoint_now
        if not self.dist.enabled:
            return reason, now
        torch = self.torch
        import torch.distributed as dist

        codes = {None: 0, "signal": 1, "preemption": 2}
        flags = torch.tensor([codes[reason], int(now)], dtype=torch.int32,
                             device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        agreed = {value: key for key, value in codes.items()}[int(flags[0])]
        if agreed and self.flags.stop_requested_at is None:
            self.flags.stop_requested_at = time.monotonic()
        return agreed, bool(flags[1])


def open_spill(cfg: Config) -> Any:
    """The local store for emergency checkpoints a remote store cannot take in time, or None.

    `--spill-dir`, else systemd's state directory (it survives a STOP/START of the VM).
    A local primary store needs none: it is on the same disk.
    """
    from spotrunner.stores import is_gcs_url
    from spotrunner.stores.local import LocalStore

    state_directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    spill_dir = cfg.spill_dir or (os.path.join(state_directory, "spill") if state_directory else "")
    if not spill_dir or not is_gcs_url(cfg.store):
        return None
    return LocalStore(os.path.join(spill_dir, cfg.run_id))


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(cfg: Config, session_id: str, flags: StopFlags, reporter: StatusReporter, dist_info: Dist) -> int:
    """Run (or resume) training to completion or a stop; returns the exit code."""
    from spotrunner import data as data_module
    from spotrunner.checkpoint.codec import weights_sha256
    from spotrunner.checkpoint.manager import CheckpointManager, Committed, Snapshot
    from spotrunner.stores import open_store

    leader = dist_info.is_leader
    store = open_store(cfg.store, cfg.run_id)
    if leader:
        store.check_access()
    final = history.read_final(store)
    if final is not None:
        log.info("run_already_completed", step=final.get("step"), weights_sha256=final.get("weights_sha256"))
        return exitcodes.OK

    lease = None
    spill = None
    if leader:
        from spotrunner.checkpoint.lease import Lease

        lease = Lease(store, session_id=session_id, ttl=cfg.lease_ttl, takeover=cfg.takeover)
        lease.acquire()
        spill = open_spill(cfg)

    lost_lease: list[str] = []
    if lease is not None:
        lease.start_renewing(lost_lease.append)

    def on_commit(committed: Committed) -> None:
        record = committed.record
        reporter.send("checkpoint", step=record["step"], reason=record["reason"], bytes=record["size"],
                      seconds=record["persist_seconds"], snapshot_seconds=record["snapshot_seconds"],
                      store=committed.store_url)

    manager = CheckpointManager(
        store, interval=cfg.checkpoint_interval, keep=cfg.keep, spill=spill,
        writer={"host": socket.gethostname(), "pid": os.getpid(), "session_id": session_id},
        check_fence=lease.check if lease is not None else (lambda: None),
        world_size=dist_info.world_size, on_commit=on_commit,
    )
    trainer = Trainer(cfg, dist_info, reporter, flags)
    dataset = data_module.load(cfg.dataset, data_dir=cfg.data_dir, synthetic_size=cfg.synthetic_size,
                               seed=cfg.seed).to(trainer.device)
    transform = data_module.BatchTransform(trainer.device, cfg.channels_last and trainer.device.type == "cuda")
    train_set = data_module.AugmentedTrainSet(dataset.train_images, dataset.train_labels)

    restored = manager.restore() if leader else None
    if dist_info.enabled:
        import torch.distributed as dist

        box = [restored[0] if restored else None]
        dist.broadcast_object_list(box, src=0)
        restored = (box[0], {}) if box[0] is not None else None
    resumed_from = None
    if restored is not None:
        trainer.load_state(restored[0])
        resumed_from = trainer.progress.step
        if restored[0].get("world_size") != dist_info.world_size:
            log.warning("world_size_changed", saved=restored[0].get("world_size"), now=dist_info.world_size,
                        effect="training continues from the same sample; weights will differ from a run "
                               "that kept one world size")
    progress = trainer.progress
    if resumed_from is not None and progress.epoch >= cfg.epochs:
        log.warning("run_already_past_epochs", epoch=progress.epoch, epochs=cfg.epochs,
                    hint="completing with the weights trained so far; raise --epochs to train on")
    num_train = dataset.train_images.shape[0]
    per_epoch = data_module.steps_per_epoch(num_train, cfg.batch_size, dist_info.world_size)
    global_batch = cfg.batch_size * dist_info.world_size
    total_steps = per_epoch * cfg.epochs
    log.info("training_started", step=progress.step, epoch=progress.epoch, total_steps=total_steps,
             resumed=resumed_from is not None, device=str(trainer.device), world_size=dist_info.world_size,
             dataset=dataset.name, train_images=num_train)
    # One progress voice per node: local rank 0 speaks for its node's supervisor.
    node_voice = dist_info.local_rank == 0
    if node_voice:
        reporter.send("started", step=progress.step, epoch=progress.epoch, total_steps=total_steps,
                  resumed_from_step=resumed_from, steps_per_epoch=per_epoch)

    def snapshot(reason: str) -> Snapshot:
        started = time.monotonic()
        state = trainer.snapshot_state()
        return Snapshot(state, progress.step, progress.epoch, reason, started, time.monotonic() - started)

    console = sys.stdout.isatty() and leader
    last_report = 0.0
    rate_mark = (time.monotonic(), progress.step)
    img_per_s = 0.0
    reason: str | None = None
    first_step_reported = False
    while progress.epoch < cfg.epochs:
        order = data_module.epoch_order(num_train, cfg.seed, progress.epoch)
        position = -(-progress.samples_in_epoch // global_batch)  # whole batches already done
        while position < per_epoch:
            reason, checkpoint_now = trainer.stop_signal()
            if reason or lost_lease or manager.fenced:
                break
            if checkpoint_now and leader:
                flags.checkpoint_now = False
                manager.save(snapshot("preemption"))
            loss = trainer.train_step(train_set, transform, order, progress.epoch, position)
            position += 1
            progress.step += 1
            progress.samples_in_epoch = min(num_train, position * global_batch)
            trainer.loss_total += loss.detach()
            progress.loss_count += 1
            if not first_step_reported and node_voice:
                first_step_reported = True
                reporter.send("first_step", step=progress.step)
            if leader and manager.should_save():
                manager.save(snapshot("periodic"))
            now = time.monotonic()
            if node_voice and now - last_report >= 0.5:
                if now - rate_mark[0] >= 1.0:
                    img_per_s = (progress.step - rate_mark[1]) * global_batch / (now - rate_mark[0])
                    rate_mark = (now, progress.step)
                last_report = now
                mean_loss = trainer.mean_loss()
                reporter.send("progress", step=progress.step, epoch=progress.epoch, total_steps=total_steps,
                              loss=round(mean_loss, 5), img_per_s=round(img_per_s, 1))
                if console:
                    done = progress.step / total_steps
                    eta = (total_steps - progress.step) * global_batch / img_per_s if img_per_s else 0
                    bar = "#" * int(done * 30)
                    set_status_line(f"[{bar:<30}] {progress.step}/{total_steps} epoch {progress.epoch + 1}/"
                                    f"{cfg.epochs} loss {mean_loss:.3f} {img_per_s:,.0f} img/s ETA {_format_eta(eta)}")
        if reason or lost_lease or manager.fenced:
            break
        evaluation_started = time.monotonic()
        test_loss, test_accuracy = trainer.evaluate(dataset, transform)
        evaluation_seconds = time.monotonic() - evaluation_started
        metrics = {"epoch": progress.epoch, "step": progress.step, "time": time.time(),
                   "train_loss": round(trainer.mean_loss(), 6),
                   "test_loss": round(test_loss, 6), "test_accuracy": round(test_accuracy, 6)}
        progress.metrics.append(metrics)
        clear_status_line()
        log.info("epoch_completed", **{k: v for k, v in metrics.items() if k != "time"},
                 evaluation_seconds=round(evaluation_seconds, 3))
        reporter.send("metrics", **metrics)
        progress.epoch += 1
        progress.samples_in_epoch = 0
        trainer.loss_total.zero_()
        progress.loss_count = 0

    clear_status_line()
    fenced_message = lost_lease[0] if lost_lease else (str(manager.fenced) if manager.fenced else None)
    if fenced_message:
        log.error("writer_fenced", error=fenced_message)
        manager.close()
        return exitcodes.FENCED

    if reason is not None:
        requested = flags.stop_requested_at or time.monotonic()
        deadline = requested + cfg.stop_deadline - STOP_MARGIN
        committed = None
        if leader:
            committed = manager.save_now(snapshot(reason), deadline)
        if dist_info.enabled:
            import torch.distributed as dist

            dist.barrier()  # the others wait for rank 0's commit before exiting
        manager.close()
        if leader and committed is None:
            log.error("stop_without_checkpoint", step=progress.step,
                      hint="the next start resumes from the last committed checkpoint")
            return exitcodes.FAILURE
        reporter.send("stopped", step=progress.step, reason=reason)
        log.info("training_stopped", step=progress.step, reason=reason)
        if lease is not None:
            lease.release(within=deadline - time.monotonic())
        return exitcodes.STOPPED

    # Completed: the final checkpoint, then the completion record that marks the run done.
    digest = weights_sha256(trainer.model.state_dict())
    if leader:
        committed = manager.save_now(snapshot("final"), time.monotonic() + 600)
        if committed is None or committed.store_url != store.url:
            log.error("final_checkpoint_failed", step=progress.step, hint="rerun to retry the upload")
            return exitcodes.FAILURE
        lease.check()
        final_record = {"step": progress.step, "epoch": progress.epoch, "weights_sha256": digest,
                        "time": time.time(), "metrics": progress.metrics[-1] if progress.metrics else None,
                        "checkpoint": history.commit_key(progress.step), "total_steps": total_steps}
        store.create(history.FINAL_KEY, history.encode(final_record))
        lease.release()
        log.info("training_completed", step=progress.step, weights_sha256=digest,
                 test_accuracy=final_record["metrics"]["test_accuracy"] if progress.metrics else None)
        reporter.send("completed", step=progress.step, weights_sha256=digest)
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()
    manager.close()
    return exitcodes.OK


def main() -> int:
    # Deterministic cuBLAS needs this before CUDA initialises (PyTorch's reproducibility notes).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    flags = StopFlags()
    flags.install()
    die_with_supervisor()
    try:
        cfg = Config.from_json(os.environ[CONFIG_ENV])
    except KeyError:
        print(f"spotrunner.trainer is started by `spotrunner run`; {CONFIG_ENV} is not set", file=sys.stderr)
        return exitcodes.CONFIG
    except ConfigError as exc:
        print(f"spotrunner: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    rank = int(os.environ.get("RANK", "0"))
    configure("trainer", cfg.run_id, log_format=cfg.log_format)
    if rank:
        from spotrunner.logs import set_label

        set_label("rank", str(rank))
    reporter = StatusReporter(os.environ.get(STATUS_SOCKET_ENV), rank)
    reporter.send("hello")
    session_id = os.environ.get(SESSION_ENV, "standalone")
    try:
        dist_info = init_distributed("cuda" if cfg.device != "cpu" and _cuda_available() else "cpu")
        code = train(cfg, session_id, flags, reporter, dist_info)
    except SpotrunnerError as exc:
        clear_status_line()
        event = {exitcodes.CONFIG: "config_error", exitcodes.FENCED: "writer_fenced"}.get(exc.exit_code, "trainer_failed")
        log.error(event, error=str(exc), code=exc.exit_code)
        code = exc.exit_code
    except Exception as exc:
        clear_status_line()
        log.exception("trainer_crashed", error=f"{type(exc).__name__}: {exc}")
        code = exitcodes.FAILURE
    reporter.send("exiting", code=code)
    return code


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    code = main()
    sys.stdout.flush()
    # os._exit: background persist/renew threads must not delay or change the exit.
    os._exit(code)
