"""The checkpoint manager: decides when to save, persists in the background, restores safely.

A save is split in two (CheckFreq, torchtitan): the trainer hands over a snapshot already
copied to CPU memory, and one background thread encodes and persists it. At most one
persist is in flight; a newer snapshot supersedes one still waiting, so memory stays
bounded and a slow store never stalls training — it produces warnings and retries.

A checkpoint counts only once its commit record exists. The commit is written last,
create-only, after the blob is durable and the writer's lease is checked (fencing), so a
torn upload, a crash mid-persist or a stale writer can never produce a loadable checkpoint.

The emergency path (`save_now`) persists in the caller's thread under a deadline that fits
the preemption window; when the store cannot make it, the checkpoint is committed to the
local spill store instead, and the next start uploads it before training on.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from spotrunner import history
from spotrunner.checkpoint import codec
from spotrunner.errors import CorruptCheckpoint, FencedError, NotFound, PreconditionFailed, StoreError
from spotrunner.logs import get_logger
from spotrunner.stores import Store

log = get_logger()

_BACKOFF_START = 1.0
_BACKOFF_MAX = 15.0
# A background attempt gets this long (more for big states at ~10 MB/s), so a failing
# store turns into warnings and retries under our backoff instead of one silent minute
# inside the client's own retry loop.
_ATTEMPT_SECONDS = 15.0
_ATTEMPT_BYTES_PER_SECOND = 10e6
_SPILL_RESERVE = 3.0  # seconds of the emergency budget kept for the local spill


@dataclass
class Snapshot:
    """A training state copied to CPU memory, ready to persist."""

    state: dict[str, Any]
    step: int
    epoch: int
    reason: str
    taken_at: float
    snapshot_seconds: float


@dataclass(frozen=True)
class Committed:
    """What a commit wrote: the commit record (history.py schema) and where."""

    record: dict[str, Any]
    store_url: str

    @property
    def step(self) -> int:
        return int(self.record["step"])


class CheckpointManager:
    def __init__(
        self,
        store: Store,
        *,
        interval: float,
        keep: int,
        writer: dict[str, Any],
        check_fence: Callable[[], None] = lambda: None,
        spill: Store | None = None,
        world_size: int = 1,
        on_commit: Callable[[Committed], None] = lambda committed: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.spill = spill
        self.interval = interval
        self.keep = keep
        self.writer = writer
        self.check_fence = check_fence
        self.world_size = world_size
        self.on_commit = on_commit
        self.clock = clock
        self.last_save_at = clock()
        self.fenced: FencedError | None = None
        # The newest commit record in the primary store, as this manager wrote or restored it.
        self.last_commit: dict[str, Any] | None = None
        self._pending: Snapshot | None = None
        self._in_flight: Snapshot | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._persist_loop, name="checkpoint-persist", daemon=True)
        self._thread.start()

    @property
    def last_committed_step(self) -> int | None:
        return None if self.last_commit is None else int(self.last_commit["step"])

    # --- deciding -----------------------------------------------------------------

    def should_save(self) -> bool:
        """True when the periodic interval has passed since the last snapshot."""
        return self.clock() - self.last_save_at >= self.interval

    # --- saving -------------------------------------------------------------------

    def save(self, snapshot: Snapshot) -> None:
        """Queue `snapshot` for a background persist, superseding one not yet started."""
        self.last_save_at = self.clock()
        with self._cond:
            if self._pending is not None:
                log.info("checkpoint_superseded", step=self._pending.step, by_step=snapshot.step)
            self._pending = snapshot
            self._cond.notify_all()

    def save_now(self, snapshot: Snapshot, deadline: float) -> Committed | None:
        """Commit `snapshot` before `deadline` (a `clock()` time), spilling locally if the store is too slow.

        Returns the commit, or None when neither the store nor the spill could take it.
        """
        self.last_save_at = self.clock()
        with self._cond:
            self._pending = None  # the emergency snapshot supersedes anything queued
            in_flight = self._in_flight
        if in_flight is not None and in_flight.step == snapshot.step:
            # The background persist is already writing this very state: let it finish.
            with self._cond:
                self._cond.wait_for(lambda: self._in_flight is None, timeout=max(0.0, deadline - self.clock()))
        last = self.last_commit
        if last is not None and last["step"] == snapshot.step:
            # A stop right after a periodic commit: that checkpoint already holds this exact
            # state, so spend none of the preemption window writing it again.
            return self._already_committed(snapshot, last)
        data = codec.encode(snapshot.state)
        budget = deadline - self.clock() - (_SPILL_RESERVE if self.spill else 0.0)
        if budget > 0.5:
            try:
                return self._persist(self.store, snapshot, data, deadline=budget)
            except FencedError:
                raise
            except StoreError as exc:
                log.warning("emergency_upload_failed", step=snapshot.step, error=str(exc), store=self.store.url)
        if self.spill is None:
            return None
        try:
            committed = self._persist(self.spill, snapshot, data, deadline=None, fence=False)
        except (StoreError, OSError) as exc:
            log.error("spill_failed", step=snapshot.step, error=str(exc))
            return None
        log.warning("checkpoint_spilled", step=snapshot.step, spill=self.spill.url,
                    hint="uploaded to the store on the next start")
        return committed

    def wait_idle(self, timeout: float) -> bool:
        """True once no persist is queued or in flight (bounded by `timeout`)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and self._in_flight is None, timeout=timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _already_committed(self, snapshot: Snapshot, record: dict[str, Any]) -> Committed:
        """`record`, the commit of `snapshot.step` made earlier, reported as this save's commit.

        The stored record keeps its own reason; the log event and the supervisor hear this
        save's reason (a stop is a stop, even when it had nothing left to write), with
        `committed_as` naming the record's.
        """
        seconds = round(self.clock() - snapshot.taken_at, 3)
        log.info("checkpoint_committed", step=snapshot.step, reason=snapshot.reason, bytes=record.get("size"),
                 seconds=seconds, store=self.store.url, committed_as=record.get("reason"))
        self.on_commit(Committed({**record, "reason": snapshot.reason, "committed_as": record.get("reason"),
                                  "persist_seconds": 0.0}, self.store.url))
        return Committed(record, self.store.url)

    def _persist_loop(self) -> None:
        backoff = _BACKOFF_START
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                snapshot, self._pending = self._pending, None
                self._in_flight = snapshot
            try:
                data = codec.encode(snapshot.state)
                attempt = max(_ATTEMPT_SECONDS, len(data) / _ATTEMPT_BYTES_PER_SECOND)
                self._persist(self.store, snapshot, data, deadline=attempt)
                backoff = _BACKOFF_START
            except FencedError as exc:
                self.fenced = exc
            except Exception as exc:  # a failing store must never kill this thread
                log.warning("checkpoint_persist_failed", step=snapshot.step, error=str(exc),
                            retry_in_seconds=backoff)
                with self._cond:
                    if self._pending is None and not self._closed:
                        self._pending = snapshot  # retry unless a newer snapshot arrived meanwhile
                    self._in_flight = None
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._closed, timeout=backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            with self._cond:
                self._in_flight = None
                self._cond.notify_all()

    def _persist(self, store: Store, snapshot: Snapshot, data: bytes, *, deadline: float | None,
                 fence: bool = True) -> Committed:
        started = self.clock()
        commit_key = history.commit_key(snapshot.step)
        blob = history.blob_key(snapshot.step, secrets.token_hex(4))
        store.create(blob, data, deadline=deadline)
        if fence:
            self.check_fence()
        record = {
            "format": history.FORMAT,
            "step": snapshot.step,
            "epoch": snapshot.epoch,
            "blob": blob,
            "sha256": codec.digest(data),
            "size": len(data),
            "reason": snapshot.reason,
            "time": time.time(),
            "snapshot_seconds": round(snapshot.snapshot_seconds, 6),
            "persist_seconds": round(self.clock() - started, 6),
            "writer": self.writer,
            "world_size": self.world_size,
        }
        remaining = None if deadline is None else max(0.5, deadline - (self.clock() - started))
        try:
            store.create(commit_key, history.encode(record), deadline=remaining)
        except PreconditionFailed:
            # This step was committed before (a resumed run replaying to a step an earlier
            # session had already committed, or a retry); training is deterministic, so
            # the existing checkpoint holds the same state. Keep it, drop our blob.
            store.delete(blob)
            log.info("checkpoint_already_committed", step=snapshot.step)
            record = history.read_json(store, commit_key) or record
        committed = Committed(record, store.url)
        seconds = self.clock() - snapshot.taken_at
        log.info("checkpoint_committed", step=snapshot.step, reason=snapshot.reason, bytes=len(data),
                 seconds=round(seconds, 3), store=store.url)
        if store is self.store:
            self.last_commit = record
            self._apply_retention(store)
        self.on_commit(committed)
        return committed

    def _apply_retention(self, store: Store) -> None:
        """Keep the newest `keep` commits; delete older ones (commit record first) and orphan blobs."""
        try:
            keys = store.list(history.CHECKPOINTS_PREFIX)
            commits = sorted(k for k in keys if k.endswith(history.COMMIT_SUFFIX))
            if not commits:
                return
            kept = commits[-self.keep:]
            oldest_kept_step = history.key_step(kept[0])
            kept_blobs = set()
            for key in kept:
                record = history.read_json(store, key)
                if record:
                    kept_blobs.add(record.get("blob"))
            for key in commits[:-self.keep]:
                store.delete(key)
            newest_step = history.key_step(kept[-1])
            for key in keys:
                if key.endswith(history.SET_ASIDE_SUFFIX) and history.key_step(key) < oldest_kept_step:
                    store.delete(key)
                if not key.endswith(".pt") or key in kept_blobs:
                    continue
                step = history.key_step(key)
                # Only blobs that can no longer be committed: older than the newest commit.
                if step < newest_step or step < oldest_kept_step:
                    store.delete(key)
        except Exception as exc:  # retention is housekeeping; never fail a commit over it
            log.warning("checkpoint_retention_failed", error=str(exc))

    # --- restoring ----------------------------------------------------------------

    def committed(self, store: Store) -> list[dict[str, Any]]:
        """Commit records in `store`, newest step first."""
        return sorted(history.read_commits(store), key=lambda record: record["step"], reverse=True)

    def restore(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, commit record) of the newest good checkpoint in the store or the spill.

        A corrupt or torn checkpoint is skipped loudly; a spilled one newer than anything
        in the store is uploaded to the store before it is returned.
        """
        candidates = [(record, self.store) for record in self.committed(self.store)]
        if self.spill is not None:
            candidates += [(record, self.spill) for record in self.committed(self.spill)]
        candidates.sort(key=lambda item: (item[0]["step"], item[1] is self.store), reverse=True)
        for record, store in candidates:
            where = f"{store.url}/{record.get('blob')}"
            try:
                data = store.read(record["blob"])
                state = codec.decode(data, sha256=record["sha256"], size=record["size"], where=where)
            except (CorruptCheckpoint, NotFound, KeyError, TypeError) as exc:
                log.error("checkpoint_corrupt", step=record.get("step"), error=str(exc),
                          action="falling back to the previous checkpoint")
                self._set_aside(store, record, str(exc))
                continue
            if store is not self.store:
                self._upload_spilled(record, data)
            self.last_commit = record
            return state, record
        return None

    def _set_aside(self, store: Store, record: dict[str, Any], error: str) -> None:
        """Move a corrupt checkpoint's commit record aside, so the replay can commit its step again.

        Commits are create-only: left in place, the damaged record would turn the replay's
        commit of that step into "already committed" and keep pointing at the bad blob (a
        stop on that step would then resume from the step before it, again). The record is
        kept as `<step>.corrupt.json` for inspection; retention removes it and the blob.
        """
        step = record.get("step")
        if not isinstance(step, int):
            return
        if store is self.store:
            self.check_fence()
        try:
            store.put(history.set_aside_key(step), history.encode({**record, "error": error, "set_aside_at": time.time()}))
            store.delete(history.commit_key(step))
        except StoreError as exc:
            log.warning("checkpoint_set_aside_failed", step=step, error=str(exc),
                        effect="the replay cannot commit this step again; the next one commits normally")

    def _upload_spilled(self, record: dict[str, Any], data: bytes) -> None:
        """Commit a spilled checkpoint to the store so the bucket is the durable home again."""
        self.check_fence()
        self.store.create(record["blob"], data)
        try:
            self.store.create(history.commit_key(record["step"]), history.encode(record))
        except PreconditionFailed:
            pass
        log.info("spilled_checkpoint_uploaded", step=record["step"], store=self.store.url)
        self._apply_retention(self.store)
        assert self.spill is not None
        for spilled in self.committed(self.spill):
            if spilled["step"] <= record["step"]:
                self.spill.delete(history.commit_key(spilled["step"]))
                self.spill.delete(spilled["blob"])
