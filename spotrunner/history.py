"""A run's history in its store: what `status` and `report` read, from any machine.

Layout of a run under `<store>/<run-id>/` (keys of the Store protocol):

    lease.json                              the writer's lease (checkpoint/lease.py)
    checkpoints/<step:012d>-<nonce>.pt      checkpoint blob, immutable (torch.save, weights_only-safe)
    checkpoints/<step:012d>.commit.json     commit record, written last; a checkpoint counts only once it exists
    checkpoints/<step:012d>.corrupt.json    a commit record set aside because its blob failed verification
    final.json                              completion record: the run is done
    sessions/<session-id>.json              one record per `spotrunner run` invocation, written by the supervisor

A session record (JSON object, `format` 1) holds:
    session_id, run_id, host, boot_id, zone, machine_type, provisioning_model ("SPOT",
    "STANDARD" or null off GCE), gpus ([{"type", "count"}]),
    started_at, updated_at, ended_at (unix seconds; ended_at null while running or when
    the session vanished: SIGKILL, power loss), state ("running" | "ended"),
    end_reason ("completed" | "preemption" | "signal" | "failed" | "config_error" | "fenced" | null),
    exit_code, notices ([{"time", "source"}]),
    trainer_starts ([{"time", "resumed_from_step", "first_step_at"}]),
    last_step, total_steps, epoch, lost_steps (steps recomputed because this session
    resumed behind where an earlier one had got to),
    checkpoints ([{"time", "step", "reason", "bytes", "seconds"}], newest 1000),
    metrics ([{"time", "step", "epoch", "train_loss", "test_loss", "test_accuracy"}]),
    throughput ([{"time", "step", "img_per_s"}], one sample per ~30 s, newest 2000).

A commit record holds: format, step, epoch, blob, sha256, size, reason
(periodic | preemption | signal | final), time (unix), snapshot_seconds,
persist_seconds, writer ({host, pid, session_id}), world_size.

`final.json` holds: step, epoch, weights_sha256, time, metrics (last epoch's), checkpoint
(the commit record's key).
"""

from __future__ import annotations

import json
from typing import Any

from spotrunner.errors import NotFound
from spotrunner.stores import Store

LEASE_KEY = "lease.json"
FINAL_KEY = "final.json"
SESSIONS_PREFIX = "sessions/"
CHECKPOINTS_PREFIX = "checkpoints/"
COMMIT_SUFFIX = ".commit.json"
SET_ASIDE_SUFFIX = ".corrupt.json"
FORMAT = 1
MAX_CHECKPOINT_ENTRIES = 1000
MAX_THROUGHPUT_ENTRIES = 2000


def session_key(session_id: str) -> str:
    return f"{SESSIONS_PREFIX}{session_id}.json"


def commit_key(step: int) -> str:
    return f"{CHECKPOINTS_PREFIX}{step:012d}{COMMIT_SUFFIX}"


def set_aside_key(step: int) -> str:
    return f"{CHECKPOINTS_PREFIX}{step:012d}{SET_ASIDE_SUFFIX}"


def key_step(key: str) -> int:
    """The step a checkpoints/ key belongs to (blob, commit or set-aside record)."""
    name = key.rsplit("/", 1)[-1]
    return int(name.split("-", 1)[0].split(".", 1)[0])  # steps past 12 digits stay whole


def blob_key(step: int, nonce: str) -> str:
    return f"{CHECKPOINTS_PREFIX}{step:012d}-{nonce}.pt"


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, indent=1).encode()


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    """The JSON object at `key`, or None when absent or unreadable (history is best effort)."""
    try:
        value = json.loads(store.read(key))
    except NotFound:
        return None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_sessions(store: Store) -> list[dict[str, Any]]:
    """Every session record of the run, oldest first."""
    sessions = []
    for key in store.list(SESSIONS_PREFIX):
        if key.endswith(".json"):
            record = read_json(store, key)
            if record is not None:
                sessions.append(record)
    sessions.sort(key=lambda record: record.get("started_at") or 0)
    return sessions


def read_commits(store: Store) -> list[dict[str, Any]]:
    """Every commit record still in the store, oldest step first (retention deletes old ones)."""
    commits = []
    for key in store.list(CHECKPOINTS_PREFIX):
        if key.endswith(COMMIT_SUFFIX):
            record = read_json(store, key)
            if record is not None:
                record["key"] = key
                commits.append(record)
    commits.sort(key=lambda record: record.get("step", -1))
    return commits


def read_set_aside(store: Store) -> list[dict[str, Any]]:
    """Commit records set aside as corrupt by a restore (with `error`), oldest step first."""
    records = [read_json(store, key) for key in store.list(CHECKPOINTS_PREFIX) if key.endswith(SET_ASIDE_SUFFIX)]
    return sorted((r for r in records if r is not None), key=lambda record: record.get("step", -1))


def read_final(store: Store) -> dict[str, Any] | None:
    return read_json(store, FINAL_KEY)
