"""systemd itself runs systemd/spotrunner.service: READY and STATUS over sd_notify, a stop commits.

A real systemd boots in systemd-nspawn (tests/support/nspawn.py). The repo's unit goes in
unchanged, with a drop-in that only adapts it to the container: the repo's .venv instead
of /opt/spotrunner/venv, a short synthetic run on a local store under the StateDirectory,
and root instead of the `spotrunner` user (the container's /etc is empty). All of the
unit's hardening stays on. `systemctl stop` must end in a committed checkpoint and exit
75 counted as success, with no restart.
"""

from __future__ import annotations

import configparser
import json
import os
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.nspawn]

UNIT = Path(REPO) / "systemd" / "spotrunner.service"
VENV = Path(REPO) / ".venv"
STORE = "/var/lib/spotrunner/runs"
RUN_ID = "nspawn-drill"


def interpreter_home() -> str:
    """The directory tree holding the .venv's base interpreter (pyvenv.cfg's home, one up)."""
    parser = configparser.ConfigParser()
    parser.read_string("[venv]\n" + (VENV / "pyvenv.cfg").read_text())
    return str(Path(parser["venv"]["home"]).resolve().parent)


def drop_in() -> str:
    lines = [
        "[Service]",
        "# The container boots with an empty /etc: there is no spotrunner user.",
        "User=root",
        "Group=root",
        "ExecStart=",
        f"ExecStart={VENV}/bin/spotrunner run --dataset synthetic --synthetic-size 2000 --epochs 50"
        f" --store {STORE} --run-id {RUN_ID} --metadata off --checkpoint-interval 2",
        "Environment=PYTHONDONTWRITEBYTECODE=1",
    ]
    if REPO.startswith(("/tmp/", "/var/tmp/")):
        # PrivateTmp=yes would hide a checkout (and its .venv) that lives under /tmp, as a
        # CI clone may; the shipped unit runs from /opt, which it does not touch.
        lines.append("PrivateTmp=no")
    home = interpreter_home()
    if home.startswith(("/root", "/home", "/run/user")):
        # ProtectHome=yes would hide this test machine's interpreter; keep home dirs
        # hidden (tmpfs) and show only that one tree, read-only.
        lines += ["ProtectHome=tmpfs", f"BindReadOnlyPaths={home}"]
    return "\n".join(lines) + "\n"


def show(container, *properties: str) -> dict[str, str]:
    args = ["systemctl", "show", "spotrunner.service"] + [f"--property={p}" for p in properties]
    output = container.run(*args).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def journal_events(container) -> list[dict]:
    lines = container.run("journalctl", "-u", "spotrunner.service", "-o", "cat", "--no-pager").stdout.splitlines()
    events = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            events.append(record)
    return events


def test_systemd_runs_the_unit_and_a_stop_commits_and_exits_75(nspawn_container):
    if not os.access(VENV / "bin" / "spotrunner", os.X_OK):
        pytest.skip(f"{VENV}/bin/spotrunner is missing; install the package into .venv")
    binds = sorted({REPO, interpreter_home(), str(Path(sys.prefix).resolve())} - {"/", "/usr"})
    container = nspawn_container(binds)

    # With a private network nothing ever comes online, and systemd-networkd-wait-online
    # would hold network-online.target (which the unit wants) for its 2 min timeout.
    container.run("systemctl", "mask", "--runtime", "systemd-networkd-wait-online.service")
    container.write("/run/systemd/system/spotrunner.service", UNIT.read_text())
    container.write("/run/systemd/system/spotrunner.service.d/50-test.conf", drop_in())
    container.run("systemctl", "daemon-reload")
    # Enabled as startup-script.sh does; it also keeps the unit loaded after it stops,
    # so its exit status can still be read.
    container.run("systemctl", "enable", "--runtime", "spotrunner.service")
    container.run("systemctl", "start", "--no-block", "spotrunner.service")

    def training_with_status() -> str | None:
        state = show(container, "ActiveState", "SubState", "StatusText")
        if state.get("ActiveState") == "failed" or state.get("SubState") == "auto-restart":
            pytest.fail("spotrunner.service failed:\n" + container.run(
                "journalctl", "-u", "spotrunner.service", "--no-pager", "-n", "40").stdout)
        if state.get("ActiveState") == "active" and "step" in state.get("StatusText", ""):
            return state["StatusText"]
        return None

    wait_for(training_with_status, 120, "spotrunner.service active with an sd_notify STATUS")
    status = container.run("systemctl", "status", "--no-pager", "spotrunner.service").stdout
    assert "active (running)" in status and "Status: \"" in status, status

    container.run("systemctl", "stop", "spotrunner.service", timeout=60)
    after = show(container, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "NRestarts")
    assert after["ActiveState"] == "inactive", after
    assert after["Result"] == "success", after  # 75 is SuccessExitStatus: a stop is not a failure
    assert after["ExecMainStatus"] == "75", after
    assert after["NRestarts"] == "0", after

    checkpoints = f"{STORE}/{RUN_ID}/checkpoints"
    commits = container.run("sh", "-c", f'ls "{checkpoints}"/*.commit.json').stdout.split()
    assert commits, f"no committed checkpoint under {checkpoints}"
    newest = json.loads(container.run("cat", sorted(commits)[-1]).stdout)
    events = journal_events(container)
    stopped = [e for e in events if e.get("event") == "training_stopped"]
    assert stopped and stopped[-1]["reason"] == "signal", stopped
    # The newest checkpoint holds the step the stop ended on. Its record says "signal",
    # unless a periodic commit of that very step landed just before the stop (then it
    # stands and the stop's commit event says so with committed_as).
    assert newest["step"] == stopped[-1]["step"], (newest, stopped)
    stops = [e for e in events if e.get("event") == "checkpoint_committed" and e.get("reason") == "signal"]
    assert stops and stops[-1]["step"] == newest["step"], stops
    assert newest["reason"] == stops[-1].get("committed_as", "signal"), (newest, stops)
