"""`spotrunner status`: in progress, completed, empty, vanished sessions, unreadable store."""

from __future__ import annotations

import io
import json
import re

import pytest

from spotrunner import history, status
from spotrunner.errors import ConfigError, StoreError
from spotrunner.stores.gcs import GCSStore
from tests.support import recorded_run
from tests.support.recorded_run import T0, TOTAL_STEPS, WEIGHTS_SHA256, write_recorded_run

# DESIGN.md: `spotrunner status --json` prints at least these, with these types.
DESIGN_FIELDS = {
    "run_id": (str,), "state": (str,), "step": (int,), "total_steps": (int, type(None)),
    "epoch": (int, type(None)), "checkpoint_step": (int, type(None)), "sessions": (int,),
    "preemptions": (int,), "lost_steps": (int,),
}


def _json_status(root: str, run_id: str) -> dict:
    out = io.StringIO()
    assert status.run(root, run_id, as_json=True, watch=False, stream=out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def _check_design_fields(obj: dict) -> None:
    for name, types in DESIGN_FIELDS.items():
        assert name in obj, f"status --json lacks {name}"
        assert isinstance(obj[name], types) and not isinstance(obj[name], bool), (name, obj[name])
    assert obj["state"] in ("new", "in_progress", "completed")
    assert "weights_sha256" in obj


def test_run_in_progress(tmp_path):
    run = write_recorded_run(str(tmp_path), "r1", completed=False)
    got = status.collect(run.store, now=run.now)
    assert got["state"] == "in_progress"
    assert got["step"] == 9075 and got["total_steps"] == TOTAL_STEPS
    assert got["epoch"] == 9075 // recorded_run.STEPS_PER_EPOCH
    assert got["checkpoint_step"] == 9000
    assert got["sessions"] == 2 and got["preemptions"] == 1 and got["lost_steps"] == 0
    assert got["weights_sha256"] is None
    assert got["percent"] == pytest.approx(100 * 9075 / TOTAL_STEPS, abs=0.01)
    # 5 steps/s over the recent throughput samples; 2655 steps to go.
    assert got["eta_seconds"] == pytest.approx((TOTAL_STEPS - 9075) / 5, rel=1e-3)
    assert got["last_checkpoint"] == {"step": 9000, "reason": "periodic",
                                      "age_seconds": pytest.approx(run.now - (T0 + 2485)),
                                      "bytes": recorded_run.CHECKPOINT_BYTES}
    assert got["current_session"]["state"] == "running"
    assert got["current_session"]["machine_type"] == recorded_run.MACHINE_TYPE
    assert got["metrics"]["step"] == 8993 and got["metrics"]["test_accuracy"] is not None

    text = status.format_human(got)
    assert "in_progress" in text and "step 9075 / 11730" in text and re.search(r"^preemptions +1$", text, re.M)


def test_completed_run_json_has_design_fields(tmp_path):
    write_recorded_run(str(tmp_path), "r1", completed=True)
    got = _json_status(str(tmp_path), "r1")
    _check_design_fields(got)
    assert got["state"] == "completed"
    assert got["weights_sha256"] == WEIGHTS_SHA256
    assert got["step"] == TOTAL_STEPS and got["checkpoint_step"] == TOTAL_STEPS
    assert got["preemptions"] == 1 and got["sessions"] == 2 and got["eta_seconds"] == 0


def test_completed_run_human_table(tmp_path):
    write_recorded_run(str(tmp_path), "r1", completed=True)
    out = io.StringIO()
    assert status.run(str(tmp_path), "r1", as_json=False, watch=False, stream=out) == 0
    text = out.getvalue()
    assert "completed" in text and WEIGHTS_SHA256 in text and "lost steps" in text


@pytest.mark.parametrize("exists", [True, False])
def test_empty_store_is_new_not_an_error(tmp_path, exists):
    root = tmp_path / "runs"
    if exists:
        root.mkdir()
    got = _json_status(str(root), "nothing-yet")
    _check_design_fields(got)
    assert got["state"] == "new" and got["step"] == 0 and got["sessions"] == 0
    assert got["checkpoint_step"] is None and got["weights_sha256"] is None
    out = io.StringIO()
    assert status.run(str(root), "nothing-yet", as_json=False, watch=False, stream=out) == 0
    assert "new" in out.getvalue() and "note: no run recorded" in out.getvalue()
    assert root.exists() == exists  # reading never creates the store


def test_vanished_sessions_count_as_preemptions_and_lost_steps_add_up(tmp_path):
    run = write_recorded_run(str(tmp_path), "r1", completed=False)
    # s2 was SIGKILLed (never ended); s3 resumed from step 9000, behind s2's 9075.
    s3 = {"session_id": "s3", "run_id": "r1", "host": "spot-vm-2", "zone": recorded_run.ZONE,
          "machine_type": recorded_run.MACHINE_TYPE, "started_at": T0 + 3000, "updated_at": T0 + 3100,
          "ended_at": None, "state": "running", "end_reason": None, "last_step": 9400,
          "total_steps": TOTAL_STEPS, "lost_steps": 75, "epoch": 24, "notices": [],
          "trainer_starts": [{"time": T0 + 3010, "resumed_from_step": 9000, "first_step_at": T0 + 3035}]}
    run.store.put(history.session_key("s3"), history.encode(s3))
    got = status.collect(run.store, now=T0 + 3110)
    assert got["sessions"] == 3
    assert got["preemptions"] == 2  # s1 by notice, s2 vanished
    assert got["lost_steps"] == 75
    assert got["step"] == 9400 and got["current_session"]["session_id"] == "s3"
    assert got["current_session"]["state"] == "running"

    # Later, s3 goes silent too: it counts as vanished, with a note.
    later = status.collect(run.store, now=T0 + 3100 + status.STALE_SECONDS + 1)
    assert later["preemptions"] == 3
    assert later["current_session"]["state"] == "vanished"
    assert any("has not reported" in note for note in later["notes"])


def test_watch_redraws_in_place_and_stops_when_completed(tmp_path):
    run = write_recorded_run(str(tmp_path), "r1", completed=False)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        # The run completes while status is watching it.
        sleeps.append(seconds)
        if len(sleeps) == 2:
            done = write_recorded_run(str(tmp_path), "r1-done", completed=True)
            for key in done.store.list():
                run.store.put(key, done.store.read(key))

    assert status.run(str(tmp_path), "r1", as_json=False, watch=True, interval=0.5, stream=screen,
                      max_refreshes=10, sleep=sleep) == 0
    text = screen.getvalue()
    assert sleeps == [0.5, 0.5]
    assert text.count("\x1b[J") == 2  # two redraws after the first drawing
    assert text.rstrip().splitlines()[-2].startswith("weights sha256")


def test_unreadable_local_store_is_one_line_config_error(tmp_path):
    (tmp_path / "not-a-dir").write_text("x")
    with pytest.raises(ConfigError) as info:
        status.read_status(str(tmp_path / "not-a-dir"), "r1")
    assert "\n" not in str(info.value) and "not a directory" in str(info.value)


def test_gcs_store_readable_then_forbidden(fault_proxy):
    url = fault_proxy.bucket_url + "/runs"
    assert status.read_status(url, "r1")["state"] == "new"

    # The recorded run, copied into the bucket, reads the same as from disk.
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        local = write_recorded_run(root, "r1", completed=True).store
        remote = GCSStore(url, "r1")
        for key in local.list():
            if key.endswith(".json"):
                remote.put(key, local.read(key))
    got = status.read_status(url, "r1")
    assert got["state"] == "completed" and got["weights_sha256"] == WEIGHTS_SHA256 and got["preemptions"] == 1

    # Every request now answered 403: the user may not read the bucket.
    fault_proxy.answer_all(403)
    with pytest.raises((ConfigError, StoreError)) as info:
        status.run(url, "r1", as_json=True, watch=False, stream=io.StringIO())
    message = str(info.value)
    assert "\n" not in message and "denied" in message, message
    assert info.value.exit_code in (78, 1)
